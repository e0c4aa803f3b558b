"""The training entry point: gin launch, resume vs initialise, exact resume after SIGKILL, SIGTERM, NaN, bad meshes."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from tasks import sources
from teacherlm_jax import checkpoints, gin_utils, shell, train, train_checkpoints, vocabularies
from teacherlm_jax.models import bloom, common, registry

REPO = pathlib.Path(__file__).resolve().parents[1]
GIN_FILES = [str(REPO / "gin" / "runs" / "train.gin"), str(REPO / "gin" / "models" / "tiny.gin")]


def _bindings(model_dir, steps, **extra):
  values = {"MIXTURE_OR_TASK_NAME": "'teacherlm_stage2_personalization'", "MODEL_DIR": f"'{model_dir}'",
            "TRAIN_STEPS": steps, "WARMUP_STEPS": 2, "LEARNING_RATE": 3e-3, "BATCH_SIZE": 8,
            "TASK_FEATURE_LENGTHS": "{'inputs': 64, 'targets': 192}", "train.save_every": 4,
            "train.log_every": 2, **extra}
  return [f"{name}={value}" for name, value in values.items()]


def _train(model_dir, steps, gin_files=GIN_FILES, **extra):
  gin.clear_config()
  try:
    gin_utils.parse_gin(gin_files, _bindings(model_dir, steps, **extra))
    return gin.get_configurable(train.train)()
  finally:
    gin.clear_config()


def _command(model_dir, steps, **extra):
  flags = [f"--gin_file={path}" for path in GIN_FILES] + [f"--gin.{b}" for b in _bindings(model_dir, steps, **extra)]
  return [sys.executable, "-m", "teacherlm_jax.train"] + flags


def _final_params(model_dir):
  return checkpoints.load_params(str(pathlib.Path(model_dir) / train_checkpoints.FINAL_PARAMS_DIR))


def _steps_logged(model_dir):
  """{step: example hashes} from the example-id log, the last entry of each step winning (replays overwrite)."""
  steps = {}
  for line in (pathlib.Path(model_dir) / "example_ids" / "process_0.jsonl").read_text().splitlines():
    entry = json.loads(line)
    steps[entry["step"]] = entry["hashes"]
  return steps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("uninterrupted")
  result = _train(model_dir, 12, **{"train.log_example_ids": True})
  return model_dir, result


def test_fresh_run_learns_and_writes_its_artifacts(uninterrupted):
  model_dir, result = uninterrupted
  assert result.start.startswith("fresh initialisation") and result.final_step == 12
  # the loss starts at ln(512) = 6.24
  assert result.final_metrics["loss"] < 5.0 and result.final_metrics["tokens_per_second"] > 0
  assert {"loss", "accuracy", "grad_norm", "learning_rate", "examples_per_second"} <= set(result.final_metrics)
  config = (model_dir / "config.gin").read_text()
  assert "MIXTURE_OR_TASK_NAME = 'teacherlm_stage2_personalization'" in config and "TRAIN_STEPS = 12" in config
  assert sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8, 12]
  assert list(model_dir.glob("events.out.tfevents.*"))
  assert (model_dir / "final_params" / "teacherlm.json").exists()
  assert checkpoints.load_vocabulary(str(model_dir / "final_params")) == vocabularies.byte_vocabulary()


@pytest.mark.parametrize("model_gin,fixture,family", [("tiny_llama.gin", "hf_llama_tiny", "llama")])
def test_other_families_train_with_their_tokenizer_and_resume(tmp_path, model_gin, fixture, family):
  """Llama through the same trainer, with its own tokenizer (BOS first in every example, id 0 an ordinary token), a
  checkpoint of the family's config, resumed; the final params record the vocabulary with the tokenizer_config.json
  that says to prepend BOS. (OPT trains through the same path in test_students.)"""
  tokenizer = REPO / "tests" / "fixtures" / fixture / "tokenizer.json"
  vocabulary_gin = tmp_path / "vocabulary.gin"
  vocabulary_gin.write_text("from __gin__ import dynamic_registration\nfrom teacherlm_jax import vocabularies\n"
                            "VOCABULARY = @vocabularies.HfTokenizerVocabulary()\n"
                            f"vocabularies.HfTokenizerVocabulary.tokenizer_path = '{tokenizer}'\n")
  files = [GIN_FILES[0], str(REPO / "gin" / "models" / model_gin), str(vocabulary_gin)]
  first = _train(tmp_path / "run", 4, files)
  resumed = _train(tmp_path / "run", 8, files)
  assert first.start.startswith("fresh initialisation") and resumed.final_step == 8
  assert resumed.start == f"resuming {tmp_path / 'run'} from its checkpoint at step 4"
  assert resumed.final_metrics["loss"] < first.final_metrics["loss"]
  final = str(tmp_path / "run" / train_checkpoints.FINAL_PARAMS_DIR)
  assert registry.family(checkpoints.load_config(final)).name == family
  recorded = checkpoints.load_vocabulary(final)
  assert recorded.add_bos and recorded.bos_id == vocabularies.HfTokenizerVocabulary(str(tokenizer)).bos_id


def test_sigkill_then_restart_is_bit_identical_and_sees_every_example_once(uninterrupted, tmp_path):
  reference_dir, _ = uninterrupted
  model_dir = tmp_path / "killed"
  process = subprocess.Popen(_command(model_dir, 12, **{"train.log_example_ids": True}),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not (model_dir / "checkpoints" / "8").exists() and time.time() < deadline and process.poll() is None:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  assert not (model_dir / "final_params").exists()

  steps = sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert sorted(int(p.name) for p in (model_dir / "input_state").iterdir()) == steps and 8 in steps
  sources.clear_scan_cache()  # as a new process: the counts come from MODEL_DIR/data_stats
  before = sources.records_rendered()
  result = _train(model_dir, 12, **{"train.log_example_ids": True})
  assert result.start.startswith(f"resuming {model_dir} from its checkpoint at step")
  # the epoch's 200 records were read (into the shuffle buffer) before step 8: the restored iterators continue
  # from there, and the counts are not rescanned, so the restart reads no record (a replay would read all 200)
  assert sources.records_rendered() - before == 0
  jax.tree.map(np.testing.assert_array_equal, _final_params(model_dir), _final_params(reference_dir))
  resumed, reference = _steps_logged(model_dir), _steps_logged(reference_dir)
  assert resumed == reference and sorted(resumed) == list(range(1, 13))
  seen = [h for hashes in resumed.values() for h in hashes]
  assert len(seen) == len(set(seen))  # 12 steps x 8 rows stay within one epoch of the 200 examples


def test_initial_checkpoint_gives_params_and_a_fresh_optimizer(uninterrupted, tmp_path):
  reference_dir, _ = uninterrupted
  result = _train(tmp_path / "warm", 0, INITIAL_CHECKPOINT_PATH=f"'{reference_dir}'")
  assert result.start.startswith(f"initialising params from {reference_dir}/final_params")
  assert result.final_step == 0
  jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / "warm"), _final_params(reference_dir))


def test_periodic_evaluation_on_the_validation_split(uninterrupted, tmp_path):
  reference_dir, _ = uninterrupted
  result = _train(tmp_path / "eval", 4, INITIAL_CHECKPOINT_PATH=f"'{reference_dir}'",
                  **{"train.eval_every": 2, "train.eval_batches": 2})
  assert 0 < result.final_metrics["eval/loss"] < 6.0 and 0 <= result.final_metrics["eval/accuracy"] <= 1
  with pytest.raises(ValueError, match="no split 'test'"):
    _train(tmp_path / "eval_missing_split", 2, **{"train.eval_every": 1, "train.eval_split": "'test'"})


def test_model_dir_of_another_model_is_refused(uninterrupted):
  reference_dir, _ = uninterrupted
  with pytest.raises(ValueError, match=r"different model \(hidden_size: checkpoint 64 vs configured 32"):
    _train(reference_dir, 14, **{"bloom.BloomConfig.hidden_size": 32})


def test_a_half_written_checkpoint_is_ignored(uninterrupted, tmp_path):
  reference_dir, _ = uninterrupted
  model_dir = tmp_path / "half"
  (model_dir / "checkpoints").mkdir(parents=True)
  for step in ("4", "8"):
    subprocess.run(["cp", "-r", str(reference_dir / "checkpoints" / step), str(model_dir / "checkpoints")],
                   check=True)
  partial = model_dir / "checkpoints" / "12.orbax-checkpoint-tmp-1234"  # what a save killed half-way leaves
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
  result = _train(model_dir, 12)
  assert result.start == f"resuming {model_dir} from its checkpoint at step 8"
  jax.tree.map(np.testing.assert_array_equal, _final_params(model_dir), _final_params(reference_dir))


def test_non_finite_loss_stops_without_saving(tmp_path):
  config = bloom.BloomConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4)
  params = jax.tree.map(np.array, nn.unbox(common.init_params(bloom.Bloom(config), jax.random.key(0))))
  params["ln_f"]["scale"][0] = np.nan
  checkpoints.save_params(str(tmp_path / "nan_params"), params, config)
  model_dir = tmp_path / "nan_run"
  with pytest.raises(shell.NonFiniteLoss, match=r"non-finite loss nan .* at step \d+; stopping without saving"):
    _train(model_dir, 8, INITIAL_CHECKPOINT_PATH=f"'{tmp_path / 'nan_params'}'")
  assert not [p for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()]
  assert not (model_dir / "final_params").exists()


def test_mesh_that_does_not_match_the_devices_fails_at_once(tmp_path):
  with pytest.raises(ValueError, match=r"mesh data=3 fsdp=1 tensor=1 needs 3 devices, but 8 are available"):
    _train(tmp_path / "mesh", 4, MESH_SHAPE="(3, 1, 1)")


def test_sigterm_checkpoints_and_exits_143_then_resumes(tmp_path):
  model_dir = tmp_path / "preempted"
  process = subprocess.Popen(_command(model_dir, 400, **{"train.save_every": 1000}), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not list((model_dir).glob("events.out.tfevents.*")) and time.time() < deadline:
    time.sleep(0.1)
  time.sleep(3)  # a few steps in
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=240)
  assert process.returncode == 143, stderr[-2000:]
  assert "SIGTERM: checkpointed step" in stderr
  steps = [int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 400
  manager = train_checkpoints.manager(str(model_dir), 1000, 3)
  assert manager.latest_step() == steps[0]


def test_a_real_model_on_the_embedded_samples_is_refused(tmp_path):
  gin.clear_config()
  try:
    gin_utils.parse_gin([GIN_FILES[0], str(REPO / "gin" / "models" / "bloom_560m.gin")], [
        "MIXTURE_OR_TASK_NAME='teacherlm_stage1_multitask'", f"MODEL_DIR='{tmp_path}'",
        f"TOKENIZER_PATH='{REPO / 'tests' / 'fixtures' / 'tokenizer' / 'tokenizer.json'}'"])
    with pytest.raises(ValueError, match=r"559M-parameter model on the small samples embedded in the package "
                                         r"\(muffin_3w, p3_sense_3k.*--gin.data_root.p3_sense_3k=.*"
                                         r"--gin.train.allow_embedded_data=True"):
      gin.get_configurable(train.train)()
  finally:
    gin.clear_config()
  assert not (tmp_path / "checkpoints").exists()
