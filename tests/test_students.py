"""The tiny pipeline end to end: curriculum -> annotation by the three teachers -> students (baseline and augmented)
-> evaluation -> report; every artifact exists and is well formed."""

import json
import pathlib

import gin
import pytest

from teacherlm_jax import checkpoints, curriculum, demo, gin_utils, report, students
from teacherlm_jax.models import registry

REPO = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _gin_run(configurable, files, bindings):
  gin.clear_config()
  try:
    gin_utils.parse_gin([str(REPO / f) for f in files], [f"{name} = {value}" for name, value in bindings.items()])
    return gin.get_configurable(configurable)()
  finally:
    gin.clear_config()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_curriculum):
  root = tmp_path_factory.mktemp("pipeline")
  annotations = demo.annotate_samples(tiny_curriculum[0], root / "annotation", per_dataset=8)
  annotated = {name: {"train": summary.output} for name, summary in annotations.items()}
  results = _gin_run(students.run, ["gin/runs/students.gin", "gin/models/tiny.gin"], {
      "MODEL_DIR": f"'{root / 'students'}'", "ANNOTATED": repr(annotated), "FINETUNE_DATASET": "'creak'",
      "EVAL_TASKS": "['teacherlm_eval_creak', 'teacherlm_eval_ecqa']", "VARIANTS": "['answer_only', 'all']",
      "MULTITASK_STEPS": 3, "FINETUNE_STEPS": 2, "BATCH_SIZE": 8, "WARMUP_STEPS": 1, "LEARNING_RATE": 3e-3,
      "TASK_FEATURE_LENGTHS": "{'inputs': 128, 'targets': 256}", "students.run.eval_max_examples": 16})
  opt_results = _gin_run(students.run, ["gin/runs/students.gin", "gin/models/tiny_opt.gin"], {
      "MODEL_DIR": f"'{root / 'students_opt'}'", "ANNOTATED": repr(annotated), "FINETUNE_DATASET": "'creak'",
      "EVAL_TASKS": "['teacherlm_eval_creak']", "VARIANTS": "['all']", "MULTITASK_STEPS": 3, "FINETUNE_STEPS": 2,
      "BATCH_SIZE": 8, "WARMUP_STEPS": 1, "LEARNING_RATE": 3e-3, "TASK_FEATURE_LENGTHS": "{'inputs': 128, 'targets': 256}",
      "students.run.eval_max_examples": 16})
  return root, annotations, {**results, "opt": opt_results}, tiny_curriculum[0]


def test_annotations_of_the_tiny_teachers(pipeline):
  _, annotations, _, _ = pipeline
  for name, summary in annotations.items():
    records = [json.loads(line) for line in pathlib.Path(summary.output).read_text().splitlines()]
    assert len(records) == summary.annotated == 8 and summary.rejected == 0
    assert all({"fundamental", "cot", "error", "all", "provenance"} <= set(r) for r in records)
    assert all(r["all"].startswith("Q: ") for r in records)


def test_students_train_finetune_and_evaluate_every_variant(pipeline):
  root, _, results, _ = pipeline
  results = {variant: accuracies for variant, accuracies in results.items() if variant != "opt"}
  assert list(results) == ["answer_only", "all"]
  stored = json.loads((root / "students" / "students_results.json").read_text())
  assert stored == results
  for variant, accuracies in results.items():
    assert set(accuracies) == {"teacherlm_eval_creak", "teacherlm_eval_ecqa"}
    assert all(0.0 <= a <= 1.0 for a in accuracies.values())
    for stage, steps in (("multitask", 3), ("finetune", 2)):
      assert curriculum.stage_finished(str(root / "students" / variant / stage), steps)
    evaluation = json.loads((root / "students" / variant / "eval" / "eval_results.json").read_text())
    assert evaluation["tasks"]["teacherlm_eval_creak"]["examples"] == 16
    assert evaluation["tasks"]["teacherlm_eval_creak"]["accuracy"] == accuracies["teacherlm_eval_creak"]
  config = (root / "students" / "all" / "multitask" / "config.gin").read_text()
  assert "loss_on_targets_only = False" in config and "keep_last_tokens = True" in config  # the release's parity


def test_an_opt_student_trains_through_the_same_command(pipeline):
  """The paper's student family: gin/models/tiny_opt.gin in place of tiny.gin, nothing else changed."""
  root, _, results, _ = pipeline
  assert list(results["opt"]) == ["all"] and 0.0 <= results["opt"]["all"]["teacherlm_eval_creak"] <= 1.0
  final = root / "students_opt" / "all" / "finetune" / "final_params"
  assert registry.family(checkpoints.load_config(str(final))).name == "opt"


def test_the_students_command_takes_a_published_opt_size():
  gin.clear_config()
  try:
    gin_utils.parse_gin([str(REPO / "gin/runs/students.gin"), str(REPO / "gin/models/opt_1_3b.gin")],
                        ["MODEL_DIR = '/tmp/unused'", "ANNOTATED = {}", "FINETUNE_DATASET = 'creak'",
                         "TOKENIZER_PATH = 'opt/tokenizer.json'"])
    config = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert registry.family(config).name == "opt" and registry.num_params(config) == 1_315_758_080


def test_the_report_has_every_section_and_plot(pipeline):
  root, _, _, curriculum_dir = pipeline
  path = pathlib.Path(report.write_report(str(root), str(curriculum_dir.parent)))
  text = path.read_text()
  for section in ("## Students", "## Training curves", "## Annotation", "## Evaluations"):
    assert section in text
  for plot in ("student_accuracy.png", "training_curves.png", "annotation_lengths.png"):
    assert (path.parent / plot).read_bytes()[:8] == PNG_MAGIC and f"({plot})" in text
  assert "| students/answer_only/multitask |" in text and "| curriculum/stage3_cot |" in text
  assert "| annotation/creak | 8 | 8 | 0 | " in text
  assert (root / "students" / "report" / "report.md").exists()  # students.run writes its own report too
  assert report.main(["--run_dir", str(root / "annotation"), "--out", str(root / "annotation_report")]) == 0
  assert "## Annotation" in (root / "annotation_report" / "report.md").read_text()


def test_report_of_an_empty_directory_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing to report"):
    report.write_report(str(tmp_path))


def test_unknown_finetune_dataset_and_variant_are_refused(tmp_path):
  with pytest.raises(ValueError, match="FINETUNE_DATASET 'x'"):
    students.run(model_dir=str(tmp_path), annotated={"creak": {"train": "a.jsonl"}}, finetune_dataset="x",
                 eval_tasks=[], data_config=None, optimizer_config=None)
  with pytest.raises(ValueError, match="unknown student variants"):
    students.run(model_dir=str(tmp_path), annotated={"creak": {"train": "a.jsonl"}}, finetune_dataset="creak",
                 eval_tasks=[], data_config=None, optimizer_config=None, variants=["socratic"])
