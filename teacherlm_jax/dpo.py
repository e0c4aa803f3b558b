"""Direct preference optimisation (DPO, Rafailov et al. 2023) of a teacher on LbT preference pairs (LbT's M2).

  loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

where log pi(y) sums the policy's log-probabilities of the response tokens given the prompt, and the reference is
the starting teacher, frozen. Pairs are JSONL rows {"prompt", "chosen", "rejected"} (`lbt.preference_pairs` makes
them from LbT scores: the best and the worst candidate of a problem). A run (`train`) starts from a teacher
checkpoint (e.g. a stage-3 teacher), keeps the reference params beside the train state, checkpoints with orbax like
`teacherlm_jax.train` (resume from MODEL_DIR at the same step and pair) and writes MODEL_DIR/final_params.
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
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from teacherlm_jax import checkpoints, convert, partitioning, shell, train_checkpoints, trainer, vocabularies

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
                   state: trainer.TrainState, reference_params: Any, batch: dict[str, jax.Array]
                   ) -> tuple[trainer.TrainState, dict[str, jax.Array]]:
  """One DPO update of the policy (`state.params`); the reference params get no gradient."""
  reference = jax.tree.map(jax.lax.stop_gradient, pair_log_probs(model, reference_params, batch))

  def loss_fn(params):
    return dpo_loss(*pair_log_probs(model, params, batch), *reference, beta)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return trainer.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_dpo_step(model: nn.Module, optimizer: optax.GradientTransformation, beta: float,
                 shardings: trainer.TrainState, mesh: Mesh,
                 rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES):
  """`dpo_train_step` under jit: (state, reference params, batch) -> (state, metrics); the old state is donated."""
  batch = trainer.batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  step = functools.partial(dpo_train_step, model, optimizer, beta)
  return jax.jit(step, in_shardings=(shardings, shardings.params, batch), out_shardings=(shardings, replicated),
                 donate_argnums=(0,))


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


def batches(pairs: Sequence[dict], vocabulary: seqio.Vocabulary, batch_size: int, length: int, seed: int,
            start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Batches of encoded pairs, each epoch in a seeded order; batch n depends only on (seed, n), so a resumed run
  continues exactly (it starts at `start_step`)."""
  encoded = [encode_pair(row, vocabulary, length) for row in pairs]
  step = start_step
  while True:
    epoch, offset = divmod(step * batch_size, len(encoded))
    order = np.random.default_rng([seed, epoch]).permutation(len(encoded))
    rows = [encoded[order[(offset + i) % len(encoded)]] for i in range(batch_size)]
    yield {name: np.stack([row[name] for row in rows]) for name in rows[0]}
    step += 1


# ----------------------------------------------------------------------------------------------- run


@dataclasses.dataclass(frozen=True)
class DpoConfig:
  """A DPO run: pairs, starting teacher, beta and the schedule."""

  pairs: str
  initial_checkpoint_path: str
  model_dir: str
  train_steps: int = 100
  beta: float = 0.1
  batch_size: int = 8
  sequence_length: int = 1024
  learning_rate: float = 1e-6
  warmup_steps: int = 10
  seed: int = 0
  save_every: int = 50
  mesh_shape: tuple[int, int, int] = (1, -1, 1)


def initial_state(config: DpoConfig, model: nn.Module, optimizer, shardings, manager, teacher_params):
  """(state, where it came from): resumed from MODEL_DIR, or the teacher's params with a fresh optimizer."""
  latest = manager.latest_step()
  if latest is not None:
    train_checkpoints.check_same_model(config.model_dir, train_checkpoints.stored_model(manager, latest),
                                       model.config)
    abstract = train_checkpoints.abstract_like(trainer.abstract_train_state(model, optimizer), shardings)
    state, _ = train_checkpoints.restore(manager, latest, abstract)
    return state, f"resuming {config.model_dir} at step {latest}"
  state = trainer.init_train_state(model, optimizer, jax.random.key(config.seed), shardings, params=teacher_params)
  return state, f"starting from {config.initial_checkpoint_path} (reference = the same params, frozen)"


def run(config: DpoConfig) -> dict[str, float]:
  """Trains the policy for `train_steps` DPO steps; returns the last step's metrics."""
  mesh = partitioning.make_mesh(*config.mesh_shape)
  rows = partitioning.data_parallel_size(mesh)
  if config.batch_size % rows:
    raise ValueError(f"batch_size {config.batch_size} is not a multiple of the data-parallel mesh size {rows} "
                     f"(data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']})")
  model, reference = convert.load_model(config.initial_checkpoint_path, mesh=mesh)
  vocabulary = checkpoints.load_vocabulary(checkpoints.resolve(config.initial_checkpoint_path))
  optimizer = trainer.make_optimizer(trainer.OptimizerConfig(
      learning_rate=config.learning_rate, warmup_steps=config.warmup_steps, total_steps=config.train_steps,
      decay="constant"))
  shardings = trainer.state_shardings(model, optimizer, mesh)
  manager = train_checkpoints.manager(config.model_dir, config.save_every, max_to_keep=2)
  state, start = initial_state(config, model, optimizer, shardings, manager, reference)
  log.info("DPO: %s", start)
  first = int(state.step)
  data = batches(read_pairs(config.pairs), vocabulary, config.batch_size, config.sequence_length, config.seed, first)
  step_fn = jit_dpo_step(model, optimizer, config.beta, shardings, mesh)
  writer = metric_writers.create_default_writer(config.model_dir, just_logging=jax.process_index() > 0)
  metrics: dict[str, float] = {}
  with partitioning.activation_rules(mesh):
    for step in tqdm(range(first, config.train_steps), initial=first, total=config.train_steps, desc="dpo",
                     unit="step", disable=jax.process_index() > 0):
      batch = partitioning.shard_host_arrays(next(data), {name: trainer.batch_sharding(mesh) for name in
                                                          ("chosen_tokens", "chosen_mask", "chosen_weights",
                                                           "rejected_tokens", "rejected_mask", "rejected_weights")})
      state, step_metrics = step_fn(state, reference, batch)
      metrics = {name: float(value) for name, value in jax.device_get(step_metrics).items()}
      writer.write_scalars(step + 1, metrics)
      train_checkpoints.save(manager, step + 1, state, {"pairs": config.pairs, "step": step + 1}, model.config,
                             force=step + 1 == config.train_steps)
  manager.wait_until_finished()
  writer.flush()
  save_final(config.model_dir, state, model.config, vocabulary)
  return metrics


def save_final(model_dir: str, state: trainer.TrainState, config: Any,
               vocabulary: Optional[seqio.Vocabulary]) -> None:
  """MODEL_DIR/final_params, written once per final step (an earlier, shorter run's are replaced)."""
  final = epath.Path(model_dir) / checkpoints.FINAL_PARAMS_DIR
  source = f"{model_dir} step {int(state.step)}"
  if (final / checkpoints.METADATA_FILE).exists() and checkpoints.read_metadata(str(final))["source"] == source:
    return
  if jax.process_index() == 0 and final.exists():
    final.rmtree()
  multihost_utils.sync_global_devices("teacherlm_dpo_final_params")
  checkpoints.save_params(str(final), state.params, config, vocabulary=vocabulary, source=source)


@gin.configurable
def dpo(*, pairs: str, initial_checkpoint_path: str, model_dir: str, **settings: Any) -> dict[str, float]:
  """The gin entry point (gin/runs/dpo.gin); `settings` are DpoConfig's other fields."""
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
