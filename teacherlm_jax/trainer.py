"""The partitioned train step: optimizer, train state created directly sharded, loss, gradient accumulation, metrics.

Batches are seqio model features ([batch, length] int32 each, from `CausalLMFeatureConverter`):
decoder_input_tokens, decoder_target_tokens, decoder_loss_weights and, for packed batches, decoder_segment_ids and
decoder_positions. The loss is the cross-entropy summed over target tokens (loss weight 1) divided by their number,
over the whole global batch, so `accumulation_steps` micro-batches give the same update as one large batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from teacherlm_jax import partitioning
from teacherlm_jax.models import common, registry

Batch = Mapping[str, jax.Array]
DECAYS = ("cosine", "linear", "constant")


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar; params: the model's params; opt_state: the optimizer's state."""

  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with warmup, a decay and global-norm clipping.

  Attributes:
    learning_rate: peak learning rate, reached after `warmup_steps`.
    warmup_steps: linear warmup from 0.
    decay: 'cosine' or 'linear' to `end_learning_rate_factor` x peak at `total_steps`, or 'constant'.
    total_steps: the step at which the decay ends.
    end_learning_rate_factor: final learning rate / peak.
    weight_decay: decoupled weight decay, applied to kernels and embeddings only (not biases or LayerNorms).
    b1, b2, eps: Adam moments.
    max_grad_norm: clip the global gradient norm to this (0 = no clipping).
  """

  learning_rate: float = 1e-4
  warmup_steps: int = 0
  decay: str = "cosine"
  total_steps: int = 1000
  end_learning_rate_factor: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: float = 1.0

  def __post_init__(self):
    if self.decay not in DECAYS:
      raise ValueError(f"decay={self.decay!r}; expected one of {DECAYS}")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  """step -> learning rate: linear warmup, then the configured decay."""
  peak, warmup = config.learning_rate, config.warmup_steps
  decay_steps = max(config.total_steps - warmup, 1)
  end = peak * config.end_learning_rate_factor
  after = {"cosine": optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_learning_rate_factor),
           "linear": optax.linear_schedule(peak, end, decay_steps),
           "constant": optax.constant_schedule(peak)}[config.decay]
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params: Any) -> Any:
  """True for matrices (kernels, embedding and position tables, untied heads), False for biases and norm scales,
  in every family: a leaf named `scale`, `bias` or `*_bias` does not decay."""
  def decays(path, _) -> bool:
    name = str(getattr(path[-1], "key", path[-1]))
    return not (name in ("scale", "bias") or name.endswith("_bias"))
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay, mask=_decay_mask)
  if config.max_grad_norm <= 0:
    return adamw
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


# ------------------------------------------------------------------------------------------------ state


def state_shardings(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES) -> TrainState:
  """`NamedSharding`s of the train state: params by the rules, optimizer moments like their params."""
  boxed = jax.eval_shape(functools.partial(common.init_params, model), jax.random.key(0))
  param_shardings = partitioning.logical_shardings(boxed, mesh, rules)
  abstract_opt_state = jax.eval_shape(optimizer.init, nn.unbox(boxed))
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = _like_params(abstract_opt_state, nn.unbox(boxed), param_shardings, replicated)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)


def _like_params(opt_state: Any, params: Any, param_shardings: Any, default: NamedSharding) -> Any:
  """Shardings for an optimizer state: any subtree shaped like the params gets the params' shardings."""
  param_structure = jax.tree.structure(params)

  def is_param_tree(node) -> bool:
    return jax.tree.structure(node) == param_structure
  return jax.tree.map(lambda node: param_shardings if is_param_tree(node) else default, opt_state,
                      is_leaf=is_param_tree)


def abstract_train_state(model: nn.Module, optimizer: optax.GradientTransformation) -> TrainState:
  """Shapes and dtypes of the train state (nothing is computed)."""
  params = nn.unbox(jax.eval_shape(functools.partial(common.init_params, model), jax.random.key(0)))
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                    opt_state=jax.eval_shape(optimizer.init, params))


def init_train_state(model: nn.Module, optimizer: optax.GradientTransformation, rng: jax.Array,
                     shardings: TrainState, params: Optional[Any] = None) -> TrainState:
  """A fresh train state laid out by `shardings`, computed under jit so no device holds more than its shards.

  With `params` (e.g. restored from an initial checkpoint), those are used and only the optimizer state is new.
  """
  def init(key, given):
    weights = nn.unbox(common.init_params(model, key)) if given is None else given
    return TrainState(step=jnp.zeros((), jnp.int32), params=weights, opt_state=optimizer.init(weights))
  in_shardings = (None, None if params is None else shardings.params)
  return jax.jit(init, in_shardings=in_shardings, out_shardings=shardings)(rng, params)


# ------------------------------------------------------------------------------------------------ loss


def loss_sums(model: nn.Module, params: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Summed cross-entropy over weighted target tokens, and the sums the metrics need (float32 scalars)."""
  logits = model.apply({"params": params}, batch["decoder_input_tokens"],
                       segment_ids=batch.get("decoder_segment_ids"), positions=batch.get("decoder_positions"))
  logits = logits.astype(jnp.float32)
  targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"].astype(jnp.float32)
  token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  # A target is "correct" when its logit is the largest (cheaper than an argmax over the vocabulary; ties count).
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  correct = (target_logits >= logits.max(axis=-1)).astype(jnp.float32)
  total = (token_loss * weights).sum()
  sums = {"loss_sum": total, "correct_sum": (correct * weights).sum(), "tokens": weights.sum(),
          "examples": _count_examples(batch)}
  return total, sums


def _count_examples(batch: Batch) -> jax.Array:
  """Examples in a batch: distinct non-zero segments per row (packed) or non-empty rows (unpacked)."""
  if "decoder_segment_ids" not in batch:
    return (batch["decoder_loss_weights"].sum(axis=1) > 0).sum().astype(jnp.float32)
  segments = batch["decoder_segment_ids"]
  starts = (segments != 0) & (segments != jnp.pad(segments[:, :-1], ((0, 0), (1, 0))))
  return starts.sum().astype(jnp.float32)


def train_step(model: nn.Module, optimizer: optax.GradientTransformation, accumulation_steps: int,
               learning_rate_fn: Optional[optax.Schedule], state: TrainState,
               batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update from a global batch [B, L] split into `accumulation_steps` micro-batches [B/A, L].

  Gradients of the summed loss are accumulated over the micro-batches (lax.scan) and divided by the total number
  of target tokens, so the update equals the one from the whole batch at once.
  """
  micro = jax.tree.map(lambda x: x.reshape((accumulation_steps, -1) + x.shape[1:]), dict(batch))
  grad_fn = jax.grad(functools.partial(loss_sums, model), has_aux=True)

  def accumulate(carry, micro_batch):
    grads, sums = grad_fn(state.params, micro_batch)
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  zeros = (jax.tree.map(jnp.zeros_like, state.params),
           {key: jnp.zeros((), jnp.float32) for key in ("loss_sum", "correct_sum", "tokens", "examples")})
  (grads, sums), _ = jax.lax.scan(accumulate, zeros, micro)
  tokens = jnp.maximum(sums["tokens"], 1.0)
  grads = jax.tree.map(lambda g: g / tokens, grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": sums["loss_sum"] / tokens, "accuracy": sums["correct_sum"] / tokens,
             "grad_norm": optax.tree.norm(grads), "tokens": sums["tokens"], "examples": sums["examples"]}
  if learning_rate_fn is not None:
    metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def batch_sharding(mesh: Mesh, rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES
                   ) -> NamedSharding:
  """Sharding of a [batch, length] feature: the batch over the data-parallel axes."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


def jit_train_step(model: nn.Module, optimizer: optax.GradientTransformation, accumulation_steps: int,
                   shardings: TrainState, mesh: Mesh,
                   rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES,
                   learning_rate_fn: Optional[optax.Schedule] = None) -> Callable:
  """`train_step` under jit with explicit in/out shardings; the old state's buffers are donated.

  Call it inside `partitioning.activation_rules(mesh, rules)` so activations get their sharding constraints.
  With `learning_rate_fn` the metrics include the learning rate of the step.
  """
  step = functools.partial(train_step, model, optimizer, accumulation_steps, learning_rate_fn)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh, rules)),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))


def model_flops_per_token(config: Any, sequence_length: int) -> float:
  """Training FLOPs per token of any family: 6 x the params used in matmuls (the LM head included, lookup tables
  not) + the attention matmuls (PaLM, appendix B); see `models.registry.flops_per_token`."""
  return registry.flops_per_token(config, sequence_length)


def global_batch(arrays: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Builds global jax Arrays from this process's rows of the batch (every process passes its own rows)."""
  return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in arrays.items()}
