"""The TeacherLM curriculum in one command: multi-task -> personalization -> three specialized teachers.

  python -m teacherlm_jax.curriculum --gin_file=gin/curriculum/teacherlm.gin --gin_file=gin/models/bloom_7b1.gin \
      --gin.MODEL_DIR="'gs://bucket/teacherlm'" --gin.TOKENIZER_PATH="'gs://bucket/bloom-7b1/tokenizer.json'"

Each stage is a `train.train` run in MODEL_DIR/<stage name>, warm-started from the final params of the stage it
follows (the first stage from INITIAL_CHECKPOINT_PATH, e.g. an imported BLOOM, or from scratch). A stage whose
final params are already at its step count is skipped; an interrupted stage resumes from its own checkpoints.
Everything else (mesh, checkpointing, logging) comes from the `train.train` bindings of gin/runs/train.gin.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Sequence

import gin
import jax
from etils import epath

from teacherlm_jax import checkpoints, input_pipeline, shell, train, train_checkpoints, trainer

log = shell.log


@dataclasses.dataclass(frozen=True)
class Stage:
  """One curriculum stage.

  Attributes:
    name: its directory under MODEL_DIR (e.g. 'stage2_personalization').
    mixture_or_task_name: what it trains on.
    train_steps, learning_rate, warmup_steps, batch_size: its schedule and batch.
    init_from: the stage whose final params it starts from (None: INITIAL_CHECKPOINT_PATH or scratch).
  """

  name: str
  mixture_or_task_name: str
  train_steps: int
  learning_rate: float
  batch_size: int
  warmup_steps: int = 0
  init_from: Optional[str] = None


def stage_finished(stage_dir: str, train_steps: int) -> bool:
  """True when the stage's final params exist and come from its last step."""
  final = epath.Path(stage_dir) / train_checkpoints.FINAL_PARAMS_DIR
  if not (final / checkpoints.METADATA_FILE).exists():
    return False
  return checkpoints.read_metadata(str(final))["source"] == train_checkpoints.final_params_source(stage_dir,
                                                                                                train_steps)


def run_stage(stage: Stage, model_dir: str, data_config: input_pipeline.DataConfig,
              optimizer_config: trainer.OptimizerConfig, initial_checkpoint_path: Optional[str]) -> dict:
  """Trains one stage (or skips it when finished); returns {"stage", "status", "first_loss", "final_loss"}."""
  stage_dir = str(epath.Path(model_dir) / stage.name)
  if stage_finished(stage_dir, stage.train_steps):
    log.info("stage %s: finished earlier, skipping", stage.name)
    return {"stage": stage.name, "status": "skipped"}
  init = str(epath.Path(model_dir) / stage.init_from) if stage.init_from else initial_checkpoint_path
  log.info("stage %s: %s for %d steps from %s", stage.name, stage.mixture_or_task_name, stage.train_steps,
           init or "scratch")
  result = gin.get_configurable(train.train)(
      model_dir=stage_dir, train_steps=stage.train_steps, initial_checkpoint_path=init,
      data_config=dataclasses.replace(data_config, mixture_or_task_name=stage.mixture_or_task_name,
                                      batch_size=stage.batch_size),
      optimizer_config=dataclasses.replace(optimizer_config, learning_rate=stage.learning_rate,
                                           warmup_steps=stage.warmup_steps, total_steps=stage.train_steps))
  losses = result.loss_curve
  summary = {"stage": stage.name, "status": result.start, "first_loss": losses[0][1] if losses else None,
             "final_loss": losses[-1][1] if losses else None}
  log.info("stage %s: loss %s -> %s", stage.name, summary["first_loss"], summary["final_loss"])
  return summary


def run(*, model_dir: str, stages: Sequence[Stage], data_config: input_pipeline.DataConfig,
        optimizer_config: trainer.OptimizerConfig, initial_checkpoint_path: Optional[str] = None) -> list[dict]:
  """Runs the stages in order (each `init_from` must name an earlier stage); returns one summary per stage."""
  names = [stage.name for stage in stages]
  for index, stage in enumerate(stages):
    if stage.init_from and stage.init_from not in names[:index]:
      raise ValueError(f"stage {stage.name} starts from {stage.init_from!r}, which is not an earlier stage {names}")
  return [run_stage(stage, model_dir, data_config, optimizer_config, initial_checkpoint_path) for stage in stages]


def print_summaries(summaries: list[dict]) -> None:
  if jax.process_index() == 0:
    for summary in summaries:
      print(f"{summary['stage']:28s} {summary['status'][:60]:60s} loss {summary.get('first_loss')} -> "
            f"{summary.get('final_loss')}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  return shell.run_entry_point(run, argv, print_summaries)


if __name__ == "__main__":
  from teacherlm_jax import curriculum as curriculum_module
  sys.exit(curriculum_module.main())
