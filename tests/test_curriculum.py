"""The curriculum: five stage directories, finished stages skipped, an interrupted stage resumed."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import gin
import pytest

from teacherlm_jax import curriculum, gin_utils

from conftest import CURRICULUM_FAST, run_tiny_curriculum

REPO = pathlib.Path(__file__).resolve().parents[1]
STAGES = ["stage1_multitask", "stage2_personalization", "stage3_fundamental", "stage3_cot",
          "stage3_common_mistakes"]
def _bindings(model_dir):
  return [f"{name}={value}" for name, value in {**CURRICULUM_FAST, "MODEL_DIR": f"'{model_dir}'"}.items()]


@pytest.fixture
def finished(tiny_curriculum):
  return tiny_curriculum


def test_all_five_stages_run_in_order_and_learn(finished):
  model_dir, summaries = finished
  assert [s["stage"] for s in summaries] == STAGES
  for stage in STAGES:
    assert (model_dir / stage / "final_params" / "teacherlm.json").exists()
  assert summaries[0]["status"].startswith("fresh initialisation")
  assert summaries[1]["status"].startswith(f"initialising params from {model_dir}/stage1_multitask/final_params")
  for summary in summaries[2:]:
    assert summary["status"].startswith(f"initialising params from {model_dir}/stage2_personalization/final_params")
  assert summaries[0]["final_loss"] < summaries[0]["first_loss"]


def test_a_second_invocation_skips_every_stage(finished):
  model_dir, _ = finished
  assert [s["status"] for s in run_tiny_curriculum(model_dir)] == ["skipped"] * 5


def test_killed_inside_stage2_resumes_stage2(tmp_path):
  model_dir = tmp_path / "interrupted"
  flags = [f"--gin.{binding}" for binding in _bindings(model_dir)]
  process = subprocess.Popen([sys.executable, "-m", "teacherlm_jax.curriculum",
                              f"--gin_file={REPO}/gin/curriculum/tiny_cpu.gin"] + flags, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoint = model_dir / "stage2_personalization" / "checkpoints" / "2"
  deadline = time.time() + 300
  while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  summaries = run_tiny_curriculum(model_dir)
  assert summaries[0]["status"] == "skipped"
  assert summaries[1]["status"].startswith(f"resuming {model_dir}/stage2_personalization from its checkpoint")
  assert all((model_dir / stage / "final_params").exists() for stage in STAGES)


def test_direct_blend_is_one_stage():
  gin.clear_config()
  try:
    gin_utils.parse_gin([str(REPO / "gin" / "curriculum" / "direct_blend.gin")], ["MODEL_DIR='/unused'"])
    stages = gin.query_parameter("curriculum.run.stages")
    assert len(stages) == 1 and stages[0].scoped_configurable_fn().mixture_or_task_name == "teacherlm_direct_blend"
  finally:
    gin.clear_config()


def test_a_stage_must_start_from_an_earlier_stage():
  stage = curriculum.Stage("b", "teacherlm_stage3_cot", 1, 1e-3, 8, init_from="a")
  with pytest.raises(ValueError, match="starts from 'a', which is not an earlier stage"):
    curriculum.run(model_dir="/unused", stages=[stage], data_config=None, optimizer_config=None)


def test_the_stage3_teachers_annotate_through_annotate_gin(finished, tmp_path):
  """The default teachers of gin/runs/annotate.gin are the curriculum's stage-3 teachers (byte vocabulary recorded)."""
  from teacherlm_jax import annotate
  model_dir, _ = finished
  sample = tmp_path / "sample.jsonl"
  sample.write_text("".join((REPO / "tasks/data/creak/validation.jsonl").read_text().splitlines(True)[:3]))
  gin.clear_config()
  try:
    gin_utils.parse_gin([str(REPO / "gin" / "runs" / "annotate.gin")], [
        f"INPUT = '{sample}'", f"OUTPUT_DIR = '{tmp_path / 'out'}'", f"CURRICULUM_DIR = '{model_dir}'",
        "MAX_NEW_TOKENS = 8", "BATCH_SIZE = 8"])
    summary = gin.get_configurable(annotate.annotate)()
  finally:
    gin.clear_config()
  assert (summary.records, summary.annotated) == (3, 3)
  assert all(3 <= n <= 24 for n in summary.new_tokens.values())  # 3 records, 1 to 8 tokens each
  record = json.loads((tmp_path / "out" / "annotated.jsonl").read_text().splitlines()[0])
  assert {"fundamental", "cot", "error", "all", "provenance"} <= set(record)
  teachers = record["provenance"]["teachers"]
  assert [t["checkpoint"] for t in teachers.values()] == [str(model_dir / f"stage3_{name}") for name in
                                                          ("fundamental", "cot", "common_mistakes")]
