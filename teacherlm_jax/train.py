"""Training entry point (T5X style): gin files + `--gin.X=` flags, resumable from MODEL_DIR.

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
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from typing import Any, Optional, Sequence

import gin
import jax
import numpy as np
from clu import metric_writers
from jax.experimental import multihost_utils
from etils import epath
from tqdm import tqdm

from tasks import config as task_config
from tasks import sources as task_sources
from teacherlm_jax import checkpoints, data_sources, input_pipeline, partitioning, shell, train_checkpoints, trainer
from teacherlm_jax.models import registry

log = shell.log
DATA_STATS_DIR = "data_stats"  # MODEL_DIR/data_stats: the persisted record counts of uncached sources
# Peak dense bfloat16 FLOP/s per device, for the MFU estimate (override with `train.peak_flops_per_device`).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12,
              "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


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
  manager = train_checkpoints.manager(model_dir, save_every, keep_checkpoints)
  state, batches_consumed, start = _initial_state(manager, model_dir, model, optimizer, shardings, data_config,
                                                  initial_checkpoint_path, seed, mesh, logical_axis_rules)
  log.info("%s", start)
  _write_config(model_dir)
  batches = _batches(model_dir, manager.latest_step(), data_config, batches_consumed, checkpoint_input_pipeline)
  step_fn = trainer.jit_train_step(model, optimizer, accumulation_steps, shardings, mesh, logical_axis_rules,
                                   learning_rate_fn=trainer.learning_rate_schedule(optimizer_config))
  context = _RunContext(model_dir, model_config, data_config, mesh, logical_axis_rules, peak_flops_per_device,
                        log_example_ids, checkpoint_input_pipeline)
  with partitioning.activation_rules(mesh, logical_axis_rules), shell.sigterm_flag() as preempted:
    state, metrics, curve = _loop(state, batches, step_fn, manager, train_steps, context, preempted, **loop_options)
  context.writer.close()
  _finish(manager, state, batches, context)
  return TrainResult(model_dir, start, int(state.step), metrics, curve)


@dataclasses.dataclass
class _RunContext:
  """The fixed parts of a run that the loop's helpers need."""

  model_dir: str
  model_config: Any
  data_config: input_pipeline.DataConfig
  mesh: jax.sharding.Mesh
  rules: partitioning.LogicalAxisRules
  peak_flops_per_device: Optional[float]
  log_example_ids: bool
  checkpoint_input_pipeline: bool = True

  def __post_init__(self):
    self.writer = metric_writers.create_default_writer(self.model_dir, just_logging=jax.process_index() > 0)
    self.sharding = trainer.batch_sharding(self.mesh, self.rules)

  @functools.cached_property
  def eval_fn(self):
    """jit(params, batch) -> the loss sums of a batch (compiled once per run)."""
    model = registry.build(self.model_config)
    return jax.jit(lambda params, batch: trainer.loss_sums(model, params, batch)[1])


def _check_batch(batch_size: int, accumulation_steps: int, mesh: jax.sharding.Mesh) -> None:
  """The micro-batch must split evenly over the data-parallel devices (data x fsdp)."""
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % accumulation_steps or (batch_size // accumulation_steps) % ways:
    raise ValueError(f"BATCH_SIZE={batch_size} with accumulation_steps={accumulation_steps} gives micro-batches "
                     f"that do not split over data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} devices")


def _initial_state(manager, model_dir, model, optimizer, shardings, data_config, initial_checkpoint_path, seed,
                   mesh, rules) -> tuple[trainer.TrainState, int, str]:
  """(state, batches already consumed, a sentence for the log): resume, initialise from a checkpoint, or fresh."""
  latest = manager.latest_step()
  if latest is not None:
    train_checkpoints.check_same_model(model_dir, train_checkpoints.stored_model(manager, latest), model.config)
    abstract = train_checkpoints.abstract_like(trainer.abstract_train_state(model, optimizer), shardings)
    state, data_state = train_checkpoints.restore(manager, latest, abstract)
    _check_same_data(model_dir, data_state, data_config)
    return state, int(data_state["batches_consumed"]), f"resuming {model_dir} from its checkpoint at step {latest}"
  if initial_checkpoint_path:
    path = checkpoints.resolve(initial_checkpoint_path)
    params = checkpoints.load_params(path, model.config, mesh=mesh, rules=rules)
    state = trainer.init_train_state(model, optimizer, jax.random.key(seed), shardings, params=params)
    return state, 0, f"initialising params from {path} (INITIAL_CHECKPOINT_PATH; fresh optimizer state, step 0)"
  state = trainer.init_train_state(model, optimizer, jax.random.key(seed), shardings)
  return state, 0, f"fresh initialisation of {model_dir} (seed {seed})"


def _batches(model_dir: str, latest: Optional[int], data_config: input_pipeline.DataConfig, batches_consumed: int,
             checkpoint_input: bool) -> input_pipeline.BatchIterator:
  """The input iterator at the run's position: restored from the step's saved input state, else by skipping."""
  if latest is None or not batches_consumed:
    return input_pipeline.BatchIterator(data_config)
  directory = train_checkpoints.input_state_dir(model_dir, latest)
  shards, num_shards = input_pipeline.shard_range(data_config, jax.process_index(), jax.process_count())
  if checkpoint_input and input_pipeline.has_saved_state(directory, shards, num_shards):
    log.info("input pipeline: restored from %s (%d batches consumed, no replay)", directory, batches_consumed)
    return input_pipeline.BatchIterator(data_config, batches_consumed, restore_from=directory)
  log.warning("input pipeline: no saved input state for %d data shards at %s; skipping %d consumed batches "
              "(replay)", num_shards, directory, batches_consumed)
  return input_pipeline.BatchIterator(data_config, batches_consumed)


def _save(manager, step: int, state, batches: input_pipeline.BatchIterator, context: "_RunContext") -> None:
  """The step's input state (synchronously), then its orbax save (asynchronously); prunes old input states."""
  if context.checkpoint_input_pipeline:
    batches.save(train_checkpoints.input_state_dir(context.model_dir, step))
  train_checkpoints.save(manager, step, state, batches.state(), context.model_config, force=True)
  train_checkpoints.prune_input_states(context.model_dir, set(manager.all_steps()) | {step})


def _check_same_data(model_dir: str, data_state: dict, data_config: input_pipeline.DataConfig) -> None:
  stored = (data_state.get("mixture_or_task_name"), data_state.get("seed"))
  if stored != (data_config.mixture_or_task_name, data_config.seed):
    raise ValueError(f"MODEL_DIR {model_dir} was trained on {stored[0]!r} with seed {stored[1]}, not "
                     f"{data_config.mixture_or_task_name!r} with seed {data_config.seed}: resuming would not "
                     "continue its data; use a new MODEL_DIR with INITIAL_CHECKPOINT_PATH")


def _write_config(model_dir: str) -> None:
  if jax.process_index() == 0:
    epath.Path(model_dir).mkdir(parents=True, exist_ok=True)
    (epath.Path(model_dir) / "config.gin").write_text(gin.operative_config_str() or gin.config_str())


def _loop(state, batches, step_fn, manager, train_steps, context: _RunContext, preempted, *, log_every,
          eval_every, eval_batches, eval_split):
  """Runs steps until `train_steps`; logs, evaluates, checkpoints; stops on SIGTERM or a non-finite loss."""
  first = int(state.step)
  metrics: dict[str, float] = {}
  curve: list[tuple[int, float]] = []
  window = _Throughput(context)
  progress = tqdm(total=train_steps, initial=first, desc="train", unit="step", disable=jax.process_index() > 0)
  for _ in range(first, train_steps):
    batch = next(batches)
    if context.log_example_ids:
      _log_example_ids(context.model_dir, int(state.step) + 1, batch)
    state, step_metrics = step_fn(state, trainer.global_batch(input_pipeline.model_features(batch),
                                                              context.sharding))
    step = int(state.step)
    window.add(batch)
    progress.update(1)
    if step % log_every == 0 or step == train_steps:
      metrics = {**_checked(step_metrics, step, manager), **window.rates()}
      curve.append((step, metrics["loss"]))
      context.writer.write_scalars(step, metrics)
      log.info("step %d: %s", step, ", ".join(f"{name} {value:.4g}" for name, value in sorted(metrics.items())))
      progress.set_postfix(loss=f"{metrics['loss']:.4f}")
    if eval_every and step % eval_every == 0:
      evaluation = _evaluate(state, context, eval_split, eval_batches)
      context.writer.write_scalars(step, evaluation)
      log.info("step %d: %s", step, ", ".join(f"{name} {value:.4g}" for name, value in sorted(evaluation.items())))
      metrics = {**metrics, **evaluation}
    if preempted() or manager.should_save(step):
      _checked(step_metrics, step, manager)
      _save(manager, step, state, batches, context)
      if preempted():
        manager.wait_until_finished()
        raise shell.Preempted(f"SIGTERM: checkpointed step {step} in {context.model_dir}; rerun the same command to resume")
  progress.close()
  return state, metrics, curve


def _checked(step_metrics: dict, step: int, manager) -> dict[str, float]:
  """Host copies of the step's metrics; raises `shell.NonFiniteLoss` (before anything is saved) if they are not finite."""
  values = {name: float(value) for name, value in jax.device_get(step_metrics).items()}
  if not (np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"])):
    raise shell.NonFiniteLoss(f"non-finite loss {values['loss']} / grad norm {values['grad_norm']} at step {step}; "
                        f"stopping without saving (last checkpoint: step {manager.latest_step()})")
  return values


class _Throughput:
  """Tokens/s, examples/s and MFU since the last report."""

  def __init__(self, context: _RunContext):
    self._context = context
    self._tokens = self._examples = 0
    self._start = time.perf_counter()
    self._flops_per_token = trainer.model_flops_per_token(
        context.model_config, sum(context.data_config.task_feature_lengths.values()))

  def add(self, batch: dict) -> None:
    scale = jax.process_count()
    self._tokens += int((batch["decoder_target_tokens"] != 0).sum()) * scale
    self._examples += len(input_pipeline.example_hashes(batch)) * scale

  def rates(self) -> dict[str, float]:
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    rates = {"tokens_per_second": self._tokens / elapsed, "examples_per_second": self._examples / elapsed}
    peak = self._context.peak_flops_per_device or _peak_flops(jax.devices()[0].device_kind)
    if peak:
      rates["mfu"] = rates["tokens_per_second"] * self._flops_per_token / (peak * jax.device_count())
    self._tokens = self._examples = 0
    self._start = time.perf_counter()
    return rates


def _peak_flops(device_kind: str) -> Optional[float]:
  for prefix, flops in sorted(PEAK_FLOPS.items(), key=lambda item: -len(item[0])):
    if device_kind.startswith(prefix):
      return flops
  return None


def _evaluate(state, context: _RunContext, split: str, num_batches: int) -> dict[str, float]:
  """Loss and token accuracy on the first `num_batches` batches of `split` (the same batches every time)."""
  eval_config = dataclasses.replace(context.data_config, split=split)
  batches = input_pipeline.BatchIterator(eval_config, shuffle=False, num_epochs=1)
  totals: dict[str, float] = {}
  for _, batch in zip(range(num_batches), batches):
    sums = jax.device_get(context.eval_fn(state.params, trainer.global_batch(input_pipeline.model_features(batch),
                                                                      context.sharding)))
    totals = {name: totals.get(name, 0.0) + float(value) for name, value in sums.items()}
  tokens = max(totals.get("tokens", 0.0), 1.0)
  return {"eval/loss": totals.get("loss_sum", 0.0) / tokens, "eval/accuracy": totals.get("correct_sum", 0.0) / tokens}


def _log_example_ids(model_dir: str, step: int, batch: dict) -> None:
  directory = epath.Path(model_dir) / "example_ids"
  directory.mkdir(parents=True, exist_ok=True)
  with (directory / f"process_{jax.process_index()}.jsonl").open("a") as handle:
    handle.write(json.dumps({"step": step, "hashes": input_pipeline.example_hashes(batch)}) + "\n")


def _finish(manager, state, batches, context: _RunContext) -> None:
  """Saves the last step, waits for all saves, and writes final_params once."""
  model_dir, model_config = context.model_dir, context.model_config
  step = int(state.step)
  if manager.latest_step() != step:
    _save(manager, step, state, batches, context)
  manager.wait_until_finished()
  final = epath.Path(model_dir) / train_checkpoints.FINAL_PARAMS_DIR
  source = f"{model_dir} step {step}"
  if (final / checkpoints.METADATA_FILE).exists() and checkpoints.read_metadata(str(final))["source"] == source:
    return
  if jax.process_index() == 0 and final.exists():
    final.rmtree()  # the params of an earlier, shorter run of this MODEL_DIR
  multihost_utils.sync_global_devices("teacherlm_final_params")
  checkpoints.save_params(str(final), state.params, model_config, source=source,
                          vocabulary=task_config.task_vocabulary())


def main(argv: Optional[Sequence[str]] = None) -> int:
  def report(result: TrainResult) -> None:
    log.info("finished %s at step %d: %s", result.model_dir, result.final_step, result.final_metrics)
  return shell.run_entry_point(train, argv, report)


if __name__ == "__main__":
  # Run the imported module (the one gin files register), not this __main__ copy of it.
  from teacherlm_jax import train as train_module
  sys.exit(train_module.main())
