"""The language-modelling objective and its entry point (T5X style): gin files + `--gin.X=` flags, resumable.

  python -m teacherlm_jax.train --gin_file=gin/runs/train.gin --gin_file=gin/models/tiny.gin \
      --gin.MIXTURE_OR_TASK_NAME="'teacherlm_stage2_personalization'" --gin.MODEL_DIR="'/tmp/run'"

Where a run starts from:
  * MODEL_DIR already holds checkpoints -> resume this run: the train state, and the data position, of the latest
    complete checkpoint (a MODEL_DIR holding another model's checkpoints is an error);
  * else INITIAL_CHECKPOINT_PATH is set -> initialise the params from that params checkpoint (e.g. `convert
    import-hf`'s output, or a finished run's MODEL_DIR), with a fresh optimizer state at step 0;
  * else fresh random params (seeded).
The log says which. The operative gin config is written to MODEL_DIR/config.gin. When training ends the params are
also written as a params checkpoint to MODEL_DIR/final_params (what the next curriculum stage starts from).

This module owns what is particular to language modelling: the seqio input pipeline as the batch source (its
iterator states checkpointed with every step, or replayed; MODEL_DIR/data_stats), the LM objective on
`train_loop` (`trainer.train_step`; throughput counts target tokens and examples; MFU), periodic evaluation on a
split, the example-id log and the refusal of a real model on the embedded samples. The loop (logging, SIGTERM,
non-finite guard) is `train_loop`'s; MODEL_DIR (resume-or-init, checkpoints, config.gin, final_params) is
`train_checkpoints.ModelDir`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import Any, Optional, Sequence

import jax
from etils import epath

from tasks import config as task_config
from tasks import sources as task_sources
from teacherlm_jax import (checkpoints, data_sources, input_pipeline, partitioning, shell, train_checkpoints,
                           train_loop, trainer)
from teacherlm_jax.models import registry

log = shell.log
DATA_STATS_DIR = "data_stats"  # MODEL_DIR/data_stats: the persisted record counts of uncached sources


@dataclasses.dataclass
class TrainResult:
  """What a finished run reports."""

  model_dir: str
  start: str
  final_step: int
  final_metrics: dict[str, float]
  loss_curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, loss) at each log step


def train(*, model_config: Any, data_config: input_pipeline.DataConfig,
          optimizer_config: trainer.OptimizerConfig, model_dir: str, train_steps: int,
          initial_checkpoint_path: Optional[str] = None, mesh_shape: Sequence[int] = (1, -1, 1),
          logical_axis_rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES,
          accumulation_steps: int = 1, save_every: int = 100, keep_checkpoints: Optional[int] = 3,
          log_every: int = 10, eval_every: int = 0, eval_batches: int = 4, eval_split: str = "validation",
          seed: int = 0, peak_flops_per_device: Optional[float] = None, log_example_ids: bool = False,
          checkpoint_input_pipeline: bool = True, allow_embedded_data: bool = False) -> TrainResult:
  """Trains `model_config` on `data_config` for `train_steps` optimizer steps into `model_dir`.

  Args:
    model_config, data_config, optimizer_config: what to train, on what, how.
    model_dir: where checkpoints, metrics (TensorBoard), config.gin and final_params go.
    train_steps: the step to stop at (a resumed run continues up to it).
    initial_checkpoint_path: params to start from when model_dir has no checkpoint.
    mesh_shape: (data, fsdp, tensor); -1 = the rest of the devices.
    logical_axis_rules: logical axis -> mesh axes.
    accumulation_steps: micro-batches per step (the global batch is data_config.batch_size).
    save_every, keep_checkpoints: checkpoint every N steps, keeping the last K (and at the end).
    log_every: write metrics every N steps. eval_every: evaluate on `eval_split` every N steps (0 = never).
    seed: parameter-initialisation seed. peak_flops_per_device: for MFU (default: a table by device kind).
    log_example_ids: append the example hashes of every step to model_dir/example_ids/process_<i>.jsonl.
    checkpoint_input_pipeline: save the input iterators with every checkpoint (resume without replay; T5X's
      option of the same name); False: a resume skips the consumed batches.
    allow_embedded_data: let a model larger than `data_sources.EMBEDDED_DATA_MAX_PARAMS` train on the samples
      embedded in the package (refused by default: a real run must bind the data roots).
  """
  data_sources.check_embedded_data(data_config.mixture_or_task_name, model_config, allow_embedded_data)
  with task_sources.persisted_scans(str(epath.Path(model_dir) / DATA_STATS_DIR)):
    data_sources.log_sources(data_config.mixture_or_task_name, data_config.split, data_config.use_cached)
    return _train(model_config, data_config, optimizer_config, model_dir, train_steps, initial_checkpoint_path,
                  mesh_shape, logical_axis_rules, accumulation_steps, save_every, keep_checkpoints, seed,
                  peak_flops_per_device, log_example_ids, checkpoint_input_pipeline,
                  dict(log_every=log_every, eval_every=eval_every, eval_batches=eval_batches, eval_split=eval_split))


def _train(model_config, data_config, optimizer_config, model_dir, train_steps, initial_checkpoint_path, mesh_shape,
           logical_axis_rules, accumulation_steps, save_every, keep_checkpoints, seed, peak_flops_per_device,
           log_example_ids, checkpoint_input_pipeline, loop_options) -> TrainResult:
  mesh = partitioning.make_mesh(*mesh_shape)
  _check_batch(data_config.batch_size, accumulation_steps, mesh)
  model = registry.build(model_config)
  optimizer = trainer.make_optimizer(optimizer_config)
  shardings = trainer.state_shardings(model, optimizer, mesh, logical_axis_rules)
  run_dir = train_checkpoints.ModelDir(model_dir, model_config, task_config.task_vocabulary(), save_every=save_every,
                                       keep_checkpoints=keep_checkpoints,
                                       save_input_states=checkpoint_input_pipeline)
  start = run_dir.start(model, optimizer, shardings, seed=seed, initial_checkpoint_path=initial_checkpoint_path,
                        load_params=functools.partial(checkpoints.load_params, config=model.config, mesh=mesh,
                                                      rules=logical_axis_rules))
  log.info("%s", start.description)
  if start.data_state is not None:
    _check_same_data(model_dir, start.data_state, data_config)
  run_dir.write_config()
  batches = _batches(run_dir, start, data_config, checkpoint_input_pipeline)
  step_fn = trainer.jit_train_step(model, optimizer, accumulation_steps, shardings, mesh, logical_axis_rules,
                                   learning_rate_fn=trainer.learning_rate_schedule(optimizer_config))
  objective = lm_objective(step_fn, model_config, data_config, trainer.batch_sharding(mesh, logical_axis_rules))
  options = train_loop.Options(
      train_steps, loop_options["log_every"], loop_options["eval_every"],
      evaluate=functools.partial(_evaluate, _Evaluation(model_config, data_config, objective.device_batch),
                                 loop_options["eval_split"], loop_options["eval_batches"]),
      on_batch=functools.partial(_log_example_ids, model_dir) if log_example_ids else None,
      peak_flops_per_device=peak_flops_per_device)
  with partitioning.activation_rules(mesh, logical_axis_rules):
    result = train_loop.run(start.state, objective, batches, run_dir, options)
  return TrainResult(model_dir, start.description, int(result.state.step), result.metrics, result.loss_curve)


def lm_objective(step_fn, model_config: Any, data_config: input_pipeline.DataConfig,
                 sharding: jax.sharding.NamedSharding) -> train_loop.Objective:
  """The language-modelling objective on the loop: `trainer.train_step` on seqio model features; throughput counts
  the target tokens and the examples (by their hashes) of every process."""
  scale = jax.process_count()
  return train_loop.Objective(
      name="train", step=step_fn,
      device_batch=lambda batch: trainer.global_batch(input_pipeline.model_features(batch), sharding),
      tokens=lambda batch: int((batch["decoder_target_tokens"] != 0).sum()) * scale,
      examples=lambda batch: len(input_pipeline.example_hashes(batch)) * scale,
      flops_per_token=trainer.model_flops_per_token(model_config, sum(data_config.task_feature_lengths.values())))


def _check_batch(batch_size: int, accumulation_steps: int, mesh: jax.sharding.Mesh) -> None:
  """The micro-batch must split evenly over the data-parallel devices (data x fsdp)."""
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % accumulation_steps or (batch_size // accumulation_steps) % ways:
    raise ValueError(f"BATCH_SIZE={batch_size} with accumulation_steps={accumulation_steps} gives micro-batches "
                     f"that do not split over data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} devices")


def _batches(run_dir: train_checkpoints.ModelDir, start: train_checkpoints.Start,
             data_config: input_pipeline.DataConfig, checkpoint_input: bool) -> input_pipeline.BatchIterator:
  """The input iterator at the run's position: restored from the step's saved input state, else by skipping."""
  batches_consumed = int(start.data_state["batches_consumed"]) if start.data_state else 0
  if not batches_consumed:
    return input_pipeline.BatchIterator(data_config)
  directory = train_checkpoints.input_state_dir(run_dir.path, int(start.state.step))
  shards, num_shards = input_pipeline.shard_range(data_config, jax.process_index(), jax.process_count())
  if checkpoint_input and input_pipeline.has_saved_state(directory, shards, num_shards):
    log.info("input pipeline: restored from %s (%d batches consumed, no replay)", directory, batches_consumed)
    return input_pipeline.BatchIterator(data_config, batches_consumed, restore_from=directory)
  log.warning("input pipeline: no saved input state for %d data shards at %s; skipping %d consumed batches "
              "(replay)", num_shards, directory, batches_consumed)
  return input_pipeline.BatchIterator(data_config, batches_consumed)


def _check_same_data(model_dir: str, data_state: dict, data_config: input_pipeline.DataConfig) -> None:
  stored = (data_state.get("mixture_or_task_name"), data_state.get("seed"))
  if stored != (data_config.mixture_or_task_name, data_config.seed):
    raise ValueError(f"MODEL_DIR {model_dir} was trained on {stored[0]!r} with seed {stored[1]}, not "
                     f"{data_config.mixture_or_task_name!r} with seed {data_config.seed}: resuming would not "
                     "continue its data; use a new MODEL_DIR with INITIAL_CHECKPOINT_PATH")


@dataclasses.dataclass
class _Evaluation:
  """What the periodic evaluation needs; its loss function is compiled once per run, at the first evaluation."""

  model_config: Any
  data_config: input_pipeline.DataConfig
  device_batch: Any

  @functools.cached_property
  def loss_sums(self):
    """jit(params, batch) -> the loss sums of a batch."""
    model = registry.build(self.model_config)
    return jax.jit(lambda params, batch: trainer.loss_sums(model, params, batch)[1])


def _evaluate(evaluation: _Evaluation, split: str, num_batches: int, state) -> dict[str, float]:
  """Loss and token accuracy on the first `num_batches` batches of `split` (the same batches every time)."""
  eval_config = dataclasses.replace(evaluation.data_config, split=split)
  batches = input_pipeline.BatchIterator(eval_config, shuffle=False, num_epochs=1)
  totals: dict[str, float] = {}
  for _, batch in zip(range(num_batches), batches):
    sums = jax.device_get(evaluation.loss_sums(state.params, evaluation.device_batch(batch)))
    totals = {name: totals.get(name, 0.0) + float(value) for name, value in sums.items()}
  tokens = max(totals.get("tokens", 0.0), 1.0)
  return {"eval/loss": totals.get("loss_sum", 0.0) / tokens, "eval/accuracy": totals.get("correct_sum", 0.0) / tokens}


def _log_example_ids(model_dir: str, step: int, batch: dict) -> None:
  directory = epath.Path(model_dir) / "example_ids"
  directory.mkdir(parents=True, exist_ok=True)
  with (directory / f"process_{jax.process_index()}.jsonl").open("a") as handle:
    handle.write(json.dumps({"step": step, "hashes": input_pipeline.example_hashes(batch)}) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
  def report(result: TrainResult) -> None:
    log.info("finished %s at step %d: %s", result.model_dir, result.final_step, result.final_metrics)
  return shell.run_entry_point(train, argv, report)


if __name__ == "__main__":
  # Run the imported module (the one gin files register), not this __main__ copy of it.
  from teacherlm_jax import train as train_module
  sys.exit(train_module.main())
