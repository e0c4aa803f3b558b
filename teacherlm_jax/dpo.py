"""Direct preference optimisation (DPO, Rafailov et al. 2023) of a teacher on LbT preference pairs (LbT's M2).

  loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

where log pi(y) sums the policy's log-probabilities of the response tokens given the prompt, and the reference is
the starting teacher, frozen. Pairs are JSONL rows {"prompt", "chosen", "rejected"} (`lbt.preference_pairs` makes
them from LbT scores: the best and the worst candidate of a problem).

This module owns the DPO objective: the loss, the sequence log-probabilities, the pairs' encoding, the batch source
over them (`PairBatches`: its state is the number of batches consumed, batch n depends only on (seed, n)) and the
step, with the reference params closed over (frozen, no gradient). A run (`run`) starts from a teacher checkpoint
(e.g. a stage-3 teacher) on the loop LM training uses (`train_loop`: metrics with throughput in TensorBoard, the
learning-rate schedule of a `trainer.OptimizerConfig`, checkpoints every `save_every` steps and on SIGTERM (exit
143; rerun to resume exactly), a stop before saving a non-finite step) in a MODEL_DIR of
`train_checkpoints.ModelDir` (resume at the same step and pair, config.gin, final_params with the vocabulary).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import Any, Iterator, Optional, Sequence

import gin
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from teacherlm_jax import (checkpoints, convert, partitioning, shell, train_checkpoints, train_loop, trainer,
                           vocabularies)

log = shell.log
SIDES = ("chosen", "rejected")


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, reference_chosen: jax.Array,
             reference_rejected: jax.Array, beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean DPO loss over pairs, from sequence log-probabilities [b] of each side; and its metrics."""
  chosen_reward = beta * (policy_chosen - reference_chosen)
  rejected_reward = beta * (policy_rejected - reference_rejected)
  margin = chosen_reward - rejected_reward
  loss = -jnp.mean(jax.nn.log_sigmoid(margin))
  return loss, {"loss": loss, "reward_accuracy": jnp.mean(margin > 0), "reward_margin": jnp.mean(margin),
                "chosen_reward": jnp.mean(chosen_reward), "rejected_reward": jnp.mean(rejected_reward)}


def sequence_log_probs(model: nn.Module, params: Any, tokens: jax.Array, mask: jax.Array,
                       weights: jax.Array) -> jax.Array:
  """Sum of log p(token_t | tokens_<t) over the weighted (response) positions: tokens, mask, weights [b, l] -> [b].

  `weights[t]` marks tokens[t] as scored; rows are right-padded (mask 0 on padding).
  """
  logits = model.apply({"params": params}, tokens, mask).astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(picked * weights[:, 1:], axis=-1)


def pair_log_probs(model: nn.Module, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  return tuple(sequence_log_probs(model, params, batch[f"{side}_tokens"], batch[f"{side}_mask"],
                                  batch[f"{side}_weights"]) for side in SIDES)


def dpo_train_step(model: nn.Module, optimizer: optax.GradientTransformation, beta: float,
                   learning_rate_fn: Optional[optax.Schedule], reference_params: Any, state: trainer.TrainState,
                   batch: dict[str, jax.Array]) -> tuple[trainer.TrainState, dict[str, jax.Array]]:
  """One DPO update of the policy (`state.params`); the reference params get no gradient."""
  reference = jax.tree.map(jax.lax.stop_gradient, pair_log_probs(model, reference_params, batch))

  def loss_fn(params):
    return dpo_loss(*pair_log_probs(model, params, batch), *reference, beta)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  if learning_rate_fn is not None:
    metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
  return trainer.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_dpo_step(model: nn.Module, optimizer: optax.GradientTransformation, beta: float, reference_params: Any,
                 shardings: trainer.TrainState, mesh: Mesh,
                 rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES,
                 learning_rate_fn: Optional[optax.Schedule] = None):
  """`dpo_train_step` under jit: (state, batch) -> (state, metrics), the frozen reference params passed in by the
  closure (an argument of the jitted function, not a constant); the old state is donated."""
  batch = trainer.batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  step = jax.jit(functools.partial(dpo_train_step, model, optimizer, beta, learning_rate_fn),
                 in_shardings=(shardings.params, shardings, batch), out_shardings=(shardings, replicated),
                 donate_argnums=(1,))
  return lambda state, pair_batch: step(reference_params, state, pair_batch)


# ----------------------------------------------------------------------------------------------- data


def encode_pair(row: dict, vocabulary: seqio.Vocabulary, length: int) -> dict[str, np.ndarray]:
  """One pair as right-padded int32 rows [length]: prompt + response + EOS, weights on response and EOS; an
  over-long sequence keeps its last tokens. The prompt starts with BOS where the model's family prepends one."""
  prompt = vocabularies.encode_prompt(vocabulary, row["prompt"])
  features = {}
  for side in SIDES:
    response = vocabulary.encode(row[side]) + [vocabulary.eos_id]
    sequence, weights = (prompt + response)[-length:], ([0] * len(prompt) + [1] * len(response))[-length:]
    for name, values in (("tokens", sequence), ("mask", [1] * len(sequence)), ("weights", weights)):
      padded = np.zeros(length, np.int32)
      padded[:len(values)] = values
      features[f"{side}_{name}"] = padded
  return features


def read_pairs(path: str) -> list[dict]:
  """Preference pairs; a row without a string prompt / chosen / rejected is an error naming its line."""
  pairs = []
  for number, line in enumerate(epath.Path(path).read_text().splitlines(), start=1):
    row = json.loads(line)
    missing = [field for field in ("prompt",) + SIDES if not isinstance(row.get(field), str)]
    if missing:
      raise ValueError(f"{path} line {number}: field {missing[0]!r} missing or not a string")
    pairs.append(row)
  if not pairs:
    raise ValueError(f"{path}: no preference pairs")
  return pairs


class PairBatches:
  """The DPO batch source: batches of encoded pairs, each epoch in a seeded order. Batch n depends only on (seed,
  n), so a run resumed at `batches_consumed` continues exactly; its `state()` is stored with every checkpoint.
  Every process builds the whole global batch."""

  def __init__(self, pairs: Sequence[dict], vocabulary: seqio.Vocabulary, batch_size: int, length: int, seed: int,
               batches_consumed: int = 0, source: str = ""):
    self._encoded = [encode_pair(row, vocabulary, length) for row in pairs]
    self.batch_size, self.seed, self.source, self.batches_consumed = batch_size, seed, source, batches_consumed

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    epoch, offset = divmod(self.batches_consumed * self.batch_size, len(self._encoded))
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self._encoded))
    rows = [self._encoded[order[(offset + i) % len(self._encoded)]] for i in range(self.batch_size)]
    self.batches_consumed += 1
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}

  def state(self) -> dict:
    return {"pairs": self.source, "seed": self.seed, "batch_size": self.batch_size,
            "batches_consumed": self.batches_consumed}

  def check_resumes(self, model_dir: str, stored: dict) -> None:
    """A resumed MODEL_DIR must have read the same pairs in the same order, else its batches would not continue."""
    wanted = {name: value for name, value in self.state().items() if name != "batches_consumed"}
    differ = {name: stored.get(name) for name, value in wanted.items() if stored.get(name) != value}
    if differ:
      raise ValueError(f"MODEL_DIR {model_dir} was trained with {differ}, not "
                       f"{ {name: wanted[name] for name in differ} }: resuming would not continue its pairs; use a "
                       "new MODEL_DIR (INITIAL_CHECKPOINT_PATH its final_params to continue from it)")


# ----------------------------------------------------------------------------------------------- run


def _default_optimizer() -> trainer.OptimizerConfig:
  return trainer.OptimizerConfig(learning_rate=1e-6, warmup_steps=10, decay="constant")


@dataclasses.dataclass(frozen=True)
class DpoConfig:
  """A DPO run: pairs, starting teacher, beta, batches, the optimizer (warmup, decay, weight decay, clipping: the
  same `trainer.OptimizerConfig` as training; its `total_steps` is where a cosine or linear decay ends) and the
  checkpointing."""

  pairs: str
  initial_checkpoint_path: str
  model_dir: str
  train_steps: int = 100
  beta: float = 0.1
  batch_size: int = 8
  sequence_length: int = 1024
  optimizer: trainer.OptimizerConfig = dataclasses.field(default_factory=_default_optimizer)
  seed: int = 0
  save_every: int = 50
  keep_checkpoints: Optional[int] = 2
  log_every: int = 1
  mesh_shape: tuple[int, int, int] = (1, -1, 1)


def run(config: DpoConfig) -> dict[str, float]:
  """Trains the policy for `train_steps` DPO steps on `train_loop`; returns the last step's metrics (loss, rewards,
  grad_norm, learning_rate, throughput). Raises `shell.Preempted` after a SIGTERM checkpoint, `shell.NonFiniteLoss`
  (nothing saved) on a non-finite step."""
  mesh = partitioning.make_mesh(*config.mesh_shape)
  _check_batch(config.batch_size, mesh)
  vocabulary = _vocabulary(config.initial_checkpoint_path)
  model, reference = convert.load_model(config.initial_checkpoint_path, mesh=mesh)
  optimizer = trainer.make_optimizer(config.optimizer)
  shardings = trainer.state_shardings(model, optimizer, mesh)
  run_dir = train_checkpoints.ModelDir(config.model_dir, model.config, vocabulary, save_every=config.save_every,
                                       keep_checkpoints=config.keep_checkpoints)
  start = run_dir.start(model, optimizer, shardings, seed=config.seed,
                        initial_checkpoint_path=config.initial_checkpoint_path, load_params=lambda _: reference)
  log.info("DPO: %s (reference: the params of %s, frozen)", start.description, config.initial_checkpoint_path)
  batches = PairBatches(read_pairs(config.pairs), vocabulary, config.batch_size, config.sequence_length, config.seed,
                        batches_consumed=int(start.data_state["batches_consumed"]) if start.data_state else 0,
                        source=config.pairs)
  if start.data_state is not None:
    batches.check_resumes(config.model_dir, start.data_state)
  run_dir.write_config()
  step_fn = jit_dpo_step(model, optimizer, config.beta, reference, shardings, mesh,
                         learning_rate_fn=trainer.learning_rate_schedule(config.optimizer))
  options = train_loop.Options(config.train_steps, config.log_every)
  with partitioning.activation_rules(mesh):
    return train_loop.run(start.state, dpo_objective(step_fn, model.config, config.sequence_length, mesh), batches,
                          run_dir, options).metrics


def dpo_objective(step_fn, model_config: Any, sequence_length: int, mesh: Mesh) -> train_loop.Objective:
  """DPO on the loop: throughput counts the pairs and the tokens of both sides; a token costs a training step of the
  policy and a forward pass of the reference (4/3 of the training FLOPs)."""
  shardings = {f"{side}_{name}": trainer.batch_sharding(mesh) for side in SIDES
               for name in ("tokens", "mask", "weights")}
  return train_loop.Objective(
      name="dpo", step=step_fn, device_batch=lambda batch: partitioning.shard_host_arrays(batch, shardings),
      tokens=lambda batch: int(sum(batch[f"{side}_mask"].sum() for side in SIDES)),
      examples=lambda batch: len(batch["chosen_tokens"]),
      flops_per_token=trainer.model_flops_per_token(model_config, sequence_length) * 4 / 3)


def _check_batch(batch_size: int, mesh: Mesh) -> None:
  rows = partitioning.data_parallel_size(mesh)
  if batch_size % rows:
    raise ValueError(f"batch_size {batch_size} is not a multiple of the data-parallel mesh size {rows} "
                     f"(data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']})")


def _vocabulary(initial_checkpoint_path: str) -> seqio.Vocabulary:
  vocabulary = checkpoints.load_vocabulary(checkpoints.resolve(initial_checkpoint_path))
  if vocabulary is None:
    raise ValueError(f"{initial_checkpoint_path} records no vocabulary ({checkpoints.VOCABULARY_FILE} or "
                     "tokenizer.json): DPO encodes the pairs with the teacher's; import the teacher with `convert "
                     "import-hf` or use a training run's MODEL_DIR")
  return vocabulary


@gin.configurable
def dpo(*, pairs: str, initial_checkpoint_path: str, model_dir: str, **settings: Any) -> dict[str, float]:
  """The gin entry point (gin/runs/dpo.gin); `settings` are DpoConfig's other fields (`optimizer`: a
  `trainer.OptimizerConfig`)."""
  if "mesh_shape" in settings:
    settings["mesh_shape"] = tuple(settings["mesh_shape"])
  return run(DpoConfig(pairs=pairs, initial_checkpoint_path=initial_checkpoint_path, model_dir=model_dir,
                       **settings))


def main(argv: Optional[Sequence[str]] = None) -> int:
  def report(metrics: dict[str, float]) -> None:
    log.info("DPO finished: %s", metrics)
  return shell.run_entry_point(dpo, argv, report)


if __name__ == "__main__":
  from teacherlm_jax import dpo as dpo_module
  sys.exit(dpo_module.main())
