"""DPO: the loss against a hand computation, its gradient direction, sequence log-probabilities, pair encoding, and
short runs on the tiny teacher on the shared training loop: the chosen log-ratio rises, the learning rate follows a
warmup schedule, a resume (after a clean end or a SIGTERM) continues exactly, a non-finite loss stops it."""

import ast
import json
import math
import os
import pathlib
import signal
import threading
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teacherlm_jax import checkpoints, convert, dpo, gin_utils, shell, train_checkpoints, trainer, vocabularies
from teacherlm_jax.models import registry

from conftest import FIXTURES

REPO = pathlib.Path(__file__).resolve().parents[1]

VOCABULARY = vocabularies.HfTokenizerVocabulary(str(FIXTURES / "hf_bloom_tiny" / "tokenizer.json"))


def test_dpo_loss_equals_a_hand_computed_value():
  # pair 1: margin = 0.5 * ((-1 - -2) - (-3 - -2)) = 1; pair 2: margin = 0.5 * ((-4 - -3) - (-2 - -2)) = -0.5
  loss, metrics = dpo.dpo_loss(jnp.array([-1.0, -4.0]), jnp.array([-3.0, -2.0]), jnp.array([-2.0, -3.0]),
                               jnp.array([-2.0, -2.0]), beta=0.5)
  expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
  assert float(loss) == pytest.approx(expected, abs=1e-6)
  assert float(metrics["reward_accuracy"]) == 0.5 and float(metrics["reward_margin"]) == pytest.approx(0.25)
  assert float(metrics["chosen_reward"]) == pytest.approx((0.5 - 0.5) / 2)


def test_the_gradient_pushes_the_chosen_log_ratio_up():
  grads = jax.grad(lambda c, r: dpo.dpo_loss(c, r, jnp.zeros(1), jnp.zeros(1), 0.1)[0], argnums=(0, 1))(
      jnp.array([-2.0]), jnp.array([-2.0]))
  assert float(grads[0][0]) == pytest.approx(-0.1 * 0.5) and float(grads[1][0]) == pytest.approx(0.1 * 0.5)


def test_sequence_log_probs_sum_the_response_tokens(hf_tiny_dir):
  model, params = convert.load_hf(str(hf_tiny_dir))
  features = dpo.encode_pair({"prompt": "Q: Why? A:", "chosen": " Because.", "rejected": " No"}, VOCABULARY, 24)
  tokens, mask, weights = (features[f"chosen_{n}"][None] for n in ("tokens", "mask", "weights"))
  ours = float(dpo.sequence_log_probs(model, params, tokens, mask, weights)[0])
  length = int(mask.sum())
  log_probs = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, tokens[:, :length])[0], axis=-1))
  expected = sum(log_probs[t - 1, tokens[0, t]] for t in range(1, length) if weights[0, t])
  assert ours == pytest.approx(expected, abs=1e-4)
  prompt = VOCABULARY.encode("Q: Why? A:")
  assert weights[0, :len(prompt)].sum() == 0 and tokens[0, length - 1] == VOCABULARY.eos_id
  short = dpo.encode_pair({"prompt": "Q: Why? A:", "chosen": " Because.", "rejected": " No"}, VOCABULARY, 4)
  assert short["chosen_tokens"][-1] == VOCABULARY.eos_id and short["chosen_weights"].sum() >= 1  # keeps the end


def test_pairs_are_checked_and_batches_depend_only_on_the_step(tmp_path):
  path = tmp_path / "pairs.jsonl"
  path.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
  with pytest.raises(ValueError, match="line 1: field 'rejected'"):
    dpo.read_pairs(str(path))
  pairs = [{"prompt": f"p{i}", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(5)]
  run = dpo.PairBatches(pairs, VOCABULARY, 2, 16, seed=3, source="pairs.jsonl")
  first = [next(run) for _ in range(6)]
  assert run.state() == {"pairs": "pairs.jsonl", "seed": 3, "batch_size": 2, "batches_consumed": 6}
  resumed = next(dpo.PairBatches(pairs, VOCABULARY, 2, 16, seed=3, batches_consumed=4))
  jax.tree.map(np.testing.assert_array_equal, resumed, first[4])
  with pytest.raises(ValueError, match=r"trained with \{'seed': 3\}, not \{'seed': 4\}: resuming would not continue"):
    dpo.PairBatches(pairs, VOCABULARY, 2, 16, seed=4, source="pairs.jsonl").check_resumes("run", run.state())


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """The tiny BLOOM teacher as a params checkpoint, and four preference pairs it can learn."""
  root = tmp_path_factory.mktemp("dpo_teacher")
  convert.import_hf(str(FIXTURES / "hf_bloom_tiny"), str(root / "teacher"))
  pairs = [{"prompt": f"Q: Is {x} cold? A: The answer is (A). Let's think step by step.",
            "chosen": f" {x} is frozen water, so it is cold.", "rejected": " The sky is green."}
           for x in ("ice", "snow", "hail", "frost")]
  (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
  return root, pairs


def _settings(teacher):
  """Every run of the tiny teacher shares one optimizer (so one compiled step): 4 warmup steps, then constant."""
  root, _ = teacher
  optimizer = trainer.OptimizerConfig(learning_rate=1e-2, warmup_steps=4, decay="constant")
  return dict(pairs=str(root / "pairs.jsonl"), initial_checkpoint_path=str(root / "teacher"), beta=0.5, batch_size=4,
              sequence_length=48, optimizer=optimizer, save_every=100, mesh_shape=(1, 4, 2))  # saves: the last step


def _trained(metrics):
  """The metrics of the training itself (not its speed)."""
  return {name: value for name, value in metrics.items() if not name.endswith("_per_second") and name != "mfu"}


def _final_params(model_dir):
  return checkpoints.load_params(str(model_dir / "final_params"))


def test_a_short_run_raises_the_chosen_log_ratio_and_resumes(teacher, tmp_path):
  """With the trainer's schedule (here a warmup): the learning rate each step reports follows it."""
  settings = _settings(teacher)
  first = dpo.run(dpo.DpoConfig(model_dir=str(tmp_path / "dpo"), train_steps=4, **settings))
  resumed = dpo.run(dpo.DpoConfig(model_dir=str(tmp_path / "dpo"), train_steps=6, **settings))
  straight = dpo.run(dpo.DpoConfig(model_dir=str(tmp_path / "straight"), train_steps=6, **settings))
  assert resumed["reward_margin"] > first["reward_margin"] > 0 and resumed["reward_accuracy"] == 1.0
  assert _trained(resumed) == pytest.approx(_trained(straight), rel=1e-5, abs=1e-6)
  assert first["learning_rate"] == pytest.approx(0.75e-2) and straight["learning_rate"] == pytest.approx(1e-2)
  assert straight["tokens_per_second"] > 0 and straight["examples_per_second"] > 0
  assert list((tmp_path / "dpo").glob("events.out.tfevents.*")) and (tmp_path / "dpo" / "config.gin").exists()
  model, reference = convert.load_model(settings["initial_checkpoint_path"])
  policy = _final_params(tmp_path / "dpo")
  batch = {k: jnp.asarray(v) for k, v in next(dpo.PairBatches(teacher[1], VOCABULARY, 4, 48, seed=0)).items()}
  policy_chosen, policy_rejected = dpo.pair_log_probs(model, policy, batch)
  reference_chosen, reference_rejected = dpo.pair_log_probs(model, reference, batch)
  assert np.all(np.asarray(policy_chosen - reference_chosen) > np.asarray(policy_rejected - reference_rejected))
  assert checkpoints.load_vocabulary(str(tmp_path / "dpo" / "final_params")) == VOCABULARY


def _dpo_gin(teacher, model_dir, steps):
  """A run through the gin entry point and gin/runs/dpo.gin (its OptimizerConfig as `_settings`'), saving every 2
  steps."""
  root, _ = teacher
  bindings = {"PAIRS": f"'{root / 'pairs.jsonl'}'", "INITIAL_CHECKPOINT_PATH": f"'{root / 'teacher'}'",
              "MODEL_DIR": f"'{model_dir}'", "TRAIN_STEPS": steps, "BETA": 0.5, "BATCH_SIZE": 4,
              "SEQUENCE_LENGTH": 48, "LEARNING_RATE": 1e-2, "WARMUP_STEPS": 4, "MESH_SHAPE": (1, 4, 2),
              "dpo.dpo.save_every": 2}
  gin.clear_config()
  try:
    gin_utils.parse_gin([str(REPO / "gin" / "runs" / "dpo.gin")], [f"{k} = {v}" for k, v in bindings.items()])
    return gin.get_configurable(dpo.dpo)()
  finally:
    gin.clear_config()


def _sigterm_once_saved(checkpoint: pathlib.Path, stop: threading.Event) -> None:
  """Sends this process a SIGTERM once `checkpoint` exists (the run is inside its loop), unless told to stop."""
  while not checkpoint.exists() and not stop.is_set():
    time.sleep(0.01)
  if not stop.is_set():
    os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_dpo_checkpoints_then_resumes_as_if_uninterrupted(teacher, tmp_path):
  """A real SIGTERM (to this process, once the step-2 checkpoint exists) checkpoints the current step and raises
  Preempted (exit 143 from the command); rerunning continues bit for bit like a run never interrupted."""
  model_dir, stop = tmp_path / "preempted", threading.Event()
  sender = threading.Thread(target=_sigterm_once_saved, args=(model_dir / "checkpoints" / "2", stop))
  previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a SIGTERM after the run cannot stop the tests
  try:
    sender.start()
    with pytest.raises(shell.Preempted, match=rf"SIGTERM: checkpointed step \d+ in {model_dir}; rerun"):
      _dpo_gin(teacher, model_dir, 400)
  finally:
    stop.set()
    sender.join()
    signal.signal(signal.SIGTERM, previous)
  config = (model_dir / "config.gin").read_text()
  assert "LEARNING_RATE = 0.01" in config and "trainer.OptimizerConfig" in config and "BETA = 0.5" in config
  preempted = train_checkpoints.manager(str(model_dir), 2, 2).latest_step()
  assert 2 <= preempted < 400 and not (model_dir / "final_params").exists()
  settings = _settings(teacher)
  resumed = dpo.run(dpo.DpoConfig(model_dir=str(model_dir), train_steps=preempted + 2, **settings))
  straight = dpo.run(dpo.DpoConfig(model_dir=str(tmp_path / "straight"), train_steps=preempted + 2, **settings))
  assert _trained(resumed) == _trained(straight)
  jax.tree.map(np.testing.assert_array_equal, _final_params(model_dir), _final_params(tmp_path / "straight"))


def test_non_finite_params_stop_dpo_without_saving(teacher, tmp_path):
  root, _ = teacher
  params = jax.tree.map(np.array, checkpoints.load_params(str(root / "teacher")))
  params["ln_f"]["scale"][0] = np.nan
  checkpoints.save_params(str(tmp_path / "nan_teacher"), params, checkpoints.load_config(str(root / "teacher")),
                          vocabulary=VOCABULARY)
  settings = {**_settings(teacher), "initial_checkpoint_path": str(tmp_path / "nan_teacher")}
  with pytest.raises(shell.NonFiniteLoss, match=r"non-finite loss nan .* at step 1; stopping without saving"):
    dpo.run(dpo.DpoConfig(model_dir=str(tmp_path / "nan_run"), train_steps=4, **settings))
  assert not [p for p in (tmp_path / "nan_run" / "checkpoints").iterdir() if p.name.isdigit()]
  assert not (tmp_path / "nan_run" / "final_params").exists()


def test_dpo_is_an_objective_of_the_shared_loop_not_of_the_lm_entry_point():
  imported = {alias.name for node in ast.walk(ast.parse(pathlib.Path(dpo.__file__).read_text()))
              if isinstance(node, ast.ImportFrom) and node.module == "teacherlm_jax" for alias in node.names}
  assert {"train_loop", "train_checkpoints", "trainer"} <= imported and "train" not in imported


def test_dpo_of_a_llama_family_teacher_on_the_same_loop(tmp_path):
  """Grouped-query attention (2 K/V heads on tensor=2), an untied head and a tokenizer that prepends BOS: the same
  DPO loop raises the chosen log-ratio, and the result is a Llama checkpoint."""
  convert.import_hf(str(FIXTURES / "hf_llama_tiny"), str(tmp_path / "teacher"))
  pairs = [{"prompt": f"Q: Is {x} cold? A:", "chosen": f" {x} is frozen water.", "rejected": " The sky is green."}
           for x in ("ice", "snow", "hail", "frost")]
  (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
  result = dpo.run(dpo.DpoConfig(model_dir=str(tmp_path / "dpo"), train_steps=4, pairs=str(tmp_path / "pairs.jsonl"),
                                 initial_checkpoint_path=str(tmp_path / "teacher"), beta=0.5, batch_size=4,
                                 sequence_length=48, optimizer=trainer.OptimizerConfig(learning_rate=1e-2,
                                                                                       decay="constant"),
                                 save_every=100, mesh_shape=(1, 4, 2)))
  assert result["reward_margin"] > 0
  final = str(tmp_path / "dpo" / "final_params")
  assert registry.family(checkpoints.load_config(final)).name == "llama"
  assert checkpoints.load_vocabulary(final).add_bos
