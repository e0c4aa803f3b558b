"""Students trained on augmented data vs on answers alone, in one command, with a report.

  python -m teacherlm_jax.students --gin_file=gin/runs/students.gin --gin_file=gin/models/tiny.gin \\
      --gin.MODEL_DIR="'/tmp/students'" \\
      --gin.ANNOTATED="{'creak': {'train': '/out/creak/annotated.jsonl'}, 'ecqa': {'train': '/out/ecqa/...'}}" \\
      --gin.FINETUNE_DATASET="'creak'" --gin.EVAL_TASKS="['teacherlm_eval_creak']"

For every variant (`answer_only` is the baseline; `fundamental`, `cot`, `common_mistakes`, `all` are augmented, see
`tasks.students`) the annotated datasets become student tasks `teacherlm_student_<dataset>_<variant>`, mixed into
`teacherlm_students_<variant>` (rates by example counts), and a student is trained in MODEL_DIR/<variant>/:

  multitask/   on the variant's mixture of all annotated datasets, from INITIAL_CHECKPOINT_PATH (or scratch)
  finetune/    on FINETUNE_DATASET's variant task only, from multitask's final params
  eval/        `teacherlm_jax.evaluate` of finetune on EVAL_TASKS (eval_results.json / .md)

Finished stages are skipped and interrupted ones resume (`curriculum.run_stage`). Parity with the official release:
`input_pipeline.DataConfig.loss_on_targets_only = False` puts the loss on the whole sequence (labels = input ids) and
`keep_last_tokens = True` keeps the last tokens of over-long examples. MODEL_DIR/students_results.json collects the
accuracies, and `teacherlm_jax.report` writes MODEL_DIR/report/ (Markdown + PNG).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Mapping, Optional, Sequence

import gin
import jax
from etils import epath

from tasks import registration, students as student_tasks
from teacherlm_jax import curriculum, evaluate, input_pipeline, report, shell, trainer

log = shell.log
RESULTS_FILE = "students_results.json"


def register_variant_mixtures(annotated: Mapping[str, Mapping[str, str]], variants: Sequence[str]) -> dict[str, str]:
  """Registers the student tasks of every annotated dataset and one mixture per variant; {variant: mixture}."""
  for name, paths in annotated.items():
    student_tasks.register_annotated(name, paths)
  mixtures = {}
  for variant in variants:
    mixtures[variant] = f"teacherlm_students_{variant}"
    registration.register_mixture(mixtures[variant], [f"teacherlm_student_{name}_{variant}" for name in annotated])
  return mixtures


def variant_stages(variant_mixture: str, finetune_task: str, *, multitask_steps: int, finetune_steps: int,
                   learning_rate: float, batch_size: int, warmup_steps: int) -> list[curriculum.Stage]:
  """Multi-task training, then fine-tuning on one task from its result."""
  return [curriculum.Stage("multitask", variant_mixture, multitask_steps, learning_rate, batch_size, warmup_steps),
          curriculum.Stage("finetune", finetune_task, finetune_steps, learning_rate, batch_size, warmup_steps,
                           init_from="multitask")]


@gin.configurable
def run(*, model_dir: str, annotated: Mapping[str, Mapping[str, str]], finetune_dataset: str,
        eval_tasks: Sequence[str], data_config: input_pipeline.DataConfig,
        optimizer_config: trainer.OptimizerConfig, variants: Sequence[str] = student_tasks.VARIANTS,
        multitask_steps: int = 1000, finetune_steps: int = 300, learning_rate: float = 1e-4, batch_size: int = 32,
        warmup_steps: int = 50, initial_checkpoint_path: Optional[str] = None, eval_batch_size: int = 32,
        eval_max_examples: Optional[int] = None) -> dict[str, Any]:
  """Trains and evaluates one student per variant; returns {variant: {task: accuracy}} (also in students_results)."""
  if finetune_dataset not in annotated:
    raise ValueError(f"FINETUNE_DATASET {finetune_dataset!r} is not one of the annotated datasets {list(annotated)}")
  unknown = [v for v in variants if v not in student_tasks.VARIANTS]
  if unknown:
    raise ValueError(f"unknown student variants {unknown}; choose from {student_tasks.VARIANTS}")
  mixtures = register_variant_mixtures(annotated, variants)
  results: dict[str, Any] = {}
  for variant in variants:
    variant_dir = epath.Path(model_dir) / variant
    stages = variant_stages(mixtures[variant], f"teacherlm_student_{finetune_dataset}_{variant}",
                            multitask_steps=multitask_steps, finetune_steps=finetune_steps,
                            learning_rate=learning_rate, batch_size=batch_size, warmup_steps=warmup_steps)
    log.info("student %s: %s", variant, [stage.mixture_or_task_name for stage in stages])
    curriculum.run(model_dir=str(variant_dir), stages=stages, data_config=data_config,
                   optimizer_config=optimizer_config, initial_checkpoint_path=initial_checkpoint_path)
    evaluation = evaluate.run(str(variant_dir / "finetune"), eval_tasks, output_dir=str(variant_dir / "eval"),
                              batch_size=eval_batch_size, max_examples=eval_max_examples)
    results[variant] = {task: result["accuracy"] for task, result in evaluation.items()}
  if jax.process_index() == 0:
    (epath.Path(model_dir) / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    report.write_report(model_dir)
  return results


def print_results(results: Mapping[str, Mapping[str, float]]) -> None:
  if jax.process_index() == 0:
    for variant, accuracies in results.items():
      print(f"{variant:16s} " + "  ".join(f"{task} {accuracy:.4f}" for task, accuracy in accuracies.items()))


def main(argv: Optional[Sequence[str]] = None) -> int:
  return shell.run_entry_point(run, argv, print_results)


if __name__ == "__main__":
  from teacherlm_jax import students as students_module
  sys.exit(students_module.main())
