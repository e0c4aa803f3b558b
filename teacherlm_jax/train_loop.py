"""The training loop every objective shares: LM training (`train`) and DPO (`dpo`) are two objectives on it.

It owns what happens from the first step to the last: it steps until `train_steps`; logs the metrics (TensorBoard
through clu, the log, tqdm) with the throughput (tokens/s, examples/s, MFU) every `log_every` steps; evaluates every
`eval_every` steps; checkpoints every `save_every` steps and, after a SIGTERM, at the end of the current step (then
raises `shell.Preempted`: exit 143, rerun to resume); stops with `shell.NonFiniteLoss` before it saves a step whose
loss or gradient norm is not finite; and ends with the last checkpoint and final_params. Where a run starts and the
MODEL_DIR's layout are `train_checkpoints.ModelDir`'s.

An objective (`Objective`) brings the jitted step `(state, batch) -> (state, metrics)` (the metrics hold at least
`loss` and `grad_norm`), how a host batch becomes the step's arrays, and how to count its tokens and examples. A batch
source (`BatchSource`) is an iterator of host batches with `state() -> dict` (JSON, stored with every checkpoint:
what a resume needs to continue the data exactly) and, optionally, `save(directory)` (its iterator states, written to
MODEL_DIR/input_state/<step> before the step's checkpoint).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping, Optional, Protocol

import jax
import numpy as np
from clu import metric_writers
from tqdm import tqdm

from teacherlm_jax import shell, train_checkpoints, trainer

log = shell.log
HostBatch = Mapping[str, np.ndarray]
# Peak dense bfloat16 FLOP/s per device, for the MFU estimate (override with `peak_flops_per_device`).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12,
              "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


class BatchSource(Protocol):
  """Host batches, resumable: `state()` is stored with each checkpoint (optional `save(directory)`: iterator
  states)."""

  def __next__(self) -> HostBatch: ...

  def state(self) -> dict: ...


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the loop trains, and how it counts a batch.

  Attributes:
    name: the progress bar's label.
    step: jitted (state, device batch) -> (state, metrics with at least `loss` and `grad_norm`).
    device_batch: a host batch of the batch source -> the step's (global, sharded) arrays.
    tokens, examples: a host batch -> the tokens / examples it trains on, all processes together.
    flops_per_token: training FLOPs per counted token, for the MFU (0: no MFU).
  """

  name: str
  step: Callable[[trainer.TrainState, dict], tuple[trainer.TrainState, dict]]
  device_batch: Callable[[HostBatch], dict]
  tokens: Callable[[HostBatch], int]
  examples: Callable[[HostBatch], int]
  flops_per_token: float = 0.0


@dataclasses.dataclass(frozen=True)
class Options:
  """How long and how often.

  Attributes:
    train_steps: the step to stop at (a resumed run continues up to it).
    log_every: write the metrics every N steps (and at the last step).
    eval_every, evaluate: every N steps (0: never), `evaluate(state)`'s metrics are logged too.
    on_batch: called with (the step about to be made, its host batch) before each step.
    peak_flops_per_device: for the MFU (default: `PEAK_FLOPS` by device kind).
  """

  train_steps: int
  log_every: int = 10
  eval_every: int = 0
  evaluate: Optional[Callable[[trainer.TrainState], dict[str, float]]] = None
  on_batch: Optional[Callable[[int, HostBatch], None]] = None
  peak_flops_per_device: Optional[float] = None


@dataclasses.dataclass
class Result:
  """The final state, the last logged metrics and (step, loss) at each log step."""

  state: trainer.TrainState
  metrics: dict[str, float]
  loss_curve: list[tuple[int, float]]


def run(state: trainer.TrainState, objective: Objective, batches: BatchSource,
        model_dir: train_checkpoints.ModelDir, options: Options) -> Result:
  """Trains from `state` to `options.train_steps`, then saves the last step and final_params (`ModelDir.finish`).

  Raises `shell.Preempted` after a SIGTERM checkpoint, `shell.NonFiniteLoss` (nothing saved) on a non-finite step.
  Call it inside `partitioning.activation_rules(mesh, rules)`.
  """
  logger = _Logger(model_dir.path, objective, options, first=int(state.step))
  try:
    with shell.sigterm_flag() as preempted:
      result = _steps(state, objective, batches, model_dir, options, logger, preempted)
  finally:
    logger.close()
  model_dir.finish(result.state, batches)
  return result


def _steps(state, objective: Objective, batches: BatchSource, model_dir: train_checkpoints.ModelDir,
           options: Options, logger: "_Logger", preempted: Callable[[], bool]) -> Result:
  """The steps; checkpoints when due or after a SIGTERM (then raises `shell.Preempted`)."""
  result = Result(state, {}, [])
  for _ in range(int(state.step), options.train_steps):
    batch = next(batches)
    if options.on_batch:
      options.on_batch(int(result.state.step) + 1, batch)
    result.state, step_metrics = objective.step(result.state, objective.device_batch(batch))
    step = int(result.state.step)
    logger.add(batch)
    if step % options.log_every == 0 or step == options.train_steps:
      result.metrics = logger.log(step, _checked(step_metrics, step, model_dir))
      result.loss_curve.append((step, result.metrics["loss"]))
    if options.eval_every and step % options.eval_every == 0:
      result.metrics = {**result.metrics, **logger.write(step, options.evaluate(result.state))}
    if preempted() or model_dir.manager.should_save(step):
      _checked(step_metrics, step, model_dir)
      model_dir.save(step, result.state, batches)
      if preempted():
        model_dir.manager.wait_until_finished()
        raise shell.Preempted(f"SIGTERM: checkpointed step {step} in {model_dir.path}; rerun the same command to "
                              "resume")
  return result


def _checked(step_metrics: dict, step: int, model_dir: train_checkpoints.ModelDir) -> dict[str, float]:
  """Host copies of the step's metrics; raises `shell.NonFiniteLoss` (before anything is saved) if they are not
  finite."""
  values = {name: float(value) for name, value in jax.device_get(step_metrics).items()}
  if not (np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"])):
    raise shell.NonFiniteLoss(f"non-finite loss {values['loss']} / grad norm {values['grad_norm']} at step {step}; "
                              f"stopping without saving (last checkpoint: step {model_dir.manager.latest_step()})")
  return values


class _Logger:
  """The metrics' sinks (TensorBoard, the log, tqdm) and the throughput since the last log step."""

  def __init__(self, directory: str, objective: Objective, options: Options, first: int):
    self._writer = metric_writers.create_default_writer(directory, just_logging=jax.process_index() > 0)
    self._objective = objective
    self._peak = options.peak_flops_per_device or peak_flops(jax.devices()[0].device_kind)
    self._progress = tqdm(total=options.train_steps, initial=first, desc=objective.name, unit="step",
                          disable=jax.process_index() > 0)
    self._tokens = self._examples = 0
    self._start = time.perf_counter()

  def add(self, batch: HostBatch) -> None:
    self._tokens += self._objective.tokens(batch)
    self._examples += self._objective.examples(batch)
    self._progress.update(1)

  def log(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
    """Writes the step's metrics with the throughput; returns them."""
    metrics = self.write(step, {**metrics, **self._rates()})
    self._progress.set_postfix(loss=f"{metrics['loss']:.4f}")
    return metrics

  def write(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
    self._writer.write_scalars(step, metrics)
    log.info("step %d: %s", step, ", ".join(f"{name} {value:.4g}" for name, value in sorted(metrics.items())))
    return metrics

  def _rates(self) -> dict[str, float]:
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    rates = {"tokens_per_second": self._tokens / elapsed, "examples_per_second": self._examples / elapsed}
    if self._peak and self._objective.flops_per_token:
      rates["mfu"] = rates["tokens_per_second"] * self._objective.flops_per_token / (self._peak * jax.device_count())
    self._tokens = self._examples = 0
    self._start = time.perf_counter()
    return rates

  def close(self) -> None:
    self._progress.close()
    self._writer.close()


def peak_flops(device_kind: str) -> Optional[float]:
  """The `PEAK_FLOPS` entry of the longest prefix of `device_kind` (None: unknown)."""
  for prefix, flops in sorted(PEAK_FLOPS.items(), key=lambda item: -len(item[0])):
    if device_kind.startswith(prefix):
      return flops
  return None
