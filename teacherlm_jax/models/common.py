"""Building blocks every model family shares: sequence layout, masked attention with a KV cache (grouped K/V heads
included), layer stacking with `nn.scan` and remat, the LM head, and the Hugging Face tensor-mapping record.

Shapes use: b = batch, l = length of this call, s = cache length, e = hidden_size, h = query heads, g = key/value
heads (h for multi-head attention; fewer with grouped-query attention, h % g == 0), r = h // g, d = head_dim,
v = vocab_size, n = num_layers.

Sequences: `segment_ids` (0 = padding, packed examples get 1, 2, ...) and `positions` (position within a segment)
describe packed and padded batches; an `attention_mask` (1 = token, 0 = pad, left or right padding, Hugging Face
style) is the shorthand for one segment per row. Positions count from each segment's first token, so a left-padded
row gets the logits of the unpadded one in every family (ALiBi, learned positions, RoPE).

KV cache (`decode=True`): per layer `key` / `value` [b, g, s, d] (head-major: a decoding step's attention reads the
cache in place), `positions` / `segment_ids` [b, s], `index` (the next free slot); the model keeps `valid_count` [b]
(valid tokens cached per row, so new tokens continue the positions). Logical axes: `CACHE_LOGICAL_AXES`.

Slot cache (the continuous-batching engine, `teacherlm_jax.engine`): the same variables, but `key`, `value`,
`positions` and `segment_ids` are tuples with one array per *tier* (tier t holds rows o_t .. o_t + b_t of the batch,
[b_t, g, s_t, d] with its own length s_t) and `index` is [b]: every row writes at its own column. A call then takes
one token per row; rows whose token has segment 0 write nothing and do not advance. Each tier's attention reads its
own length only, so rows that stay short are kept in a short tier.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
NEG_INF = -1e30  # finite, so rows whose keys are all masked (pad queries) stay finite

REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}

CACHE_LOGICAL_AXES = {
    "key": ("batch", "kv_heads", "length", "kv"),
    "value": ("batch", "kv_heads", "length", "kv"),
    "positions": ("batch", "length"),
    "segment_ids": ("batch", "length"),
    "index": (),
    "valid_count": ("batch",),
}

# Fields of every family's config that choose how a model runs, not what it is (a checkpoint may be loaded with
# other values of these).
RUNTIME_FIELDS = ("dtype", "param_dtype", "logits_dtype", "scan_layers", "scan_unroll", "remat_policy")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The fields every family's config has besides its dimensions.

  Attributes:
    dtype: compute dtype of activations and matmuls (e.g. "bfloat16").
    param_dtype: storage dtype of parameters (normally "float32").
    logits_dtype: dtype of the returned logits.
    scan_layers: stack the blocks with `nn.scan` (params get a leading `layers` axis) instead of n separate modules.
    scan_unroll: layers per scan iteration (1 = a loop; num_layers = fully unrolled, faster on CPU, slower to
      compile); the params layout does not change.
    remat_policy: "none" or a key of `REMAT_POLICIES`: what the backward pass may keep instead of recomputing.
    initializer_range: std of the normal initializer of kernels and embeddings.
  """

  dtype: str = "float32"
  param_dtype: str = "float32"
  logits_dtype: str = "float32"
  scan_layers: bool = True
  scan_unroll: int = 1
  remat_policy: str = "none"
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.remat_policy != "none" and self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; expected 'none' or one of {sorted(REMAT_POLICIES)}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> Any:
    """`cls(**values)`, refusing unknown fields by name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
      raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class TensorMapping:
  """How one Hugging Face tensor maps onto one params leaf.

  Attributes:
    path: the leaf's path in the params tree; layer: its index along the stacked `layers` axis (scanned params),
    or None; shape: the Hugging Face tensor's shape; to_flax / to_hf: the reshapes between the two layouts.
  """

  path: tuple[str, ...]
  layer: Optional[int]
  shape: tuple[int, ...]
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def transpose(x: np.ndarray) -> np.ndarray:
  return x.T


def layer_mappings(config: Any, layers_name: str, hf_layer_prefix: str,
                   per_layer: dict[str, tuple[tuple[str, ...], tuple[int, ...], Callable, Callable]]
                   ) -> dict[str, TensorMapping]:
  """The mappings of every layer: `hf_layer_prefix.{n}.{suffix}` -> `layers_name[/n]/path` for each per-layer entry
  (suffix -> (path, HF shape, to_flax, to_hf))."""
  mappings = {}
  for n in range(config.num_layers):
    prefix = (layers_name,) if config.scan_layers else (f"{layers_name}_{n}",)
    for suffix, (path, shape, to_flax, to_hf) in per_layer.items():
      mappings[f"{hf_layer_prefix}.{n}.{suffix}"] = TensorMapping(
          prefix + path, n if config.scan_layers else None, shape, to_flax, to_hf)
  return mappings


# ------------------------------------------------------------------------------------------------ sequences


def segment_positions(segment_ids: Array) -> Array:
  """Position of each token inside its segment [b, l], counting from the segment's first token.

  Works for left padding (pads get segment 0), right padding and packed rows alike.
  """
  length = segment_ids.shape[-1]
  index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
  changed = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(changed, index, 0), axis=1)
  return index - start


def sequence_layout(module: nn.Module, input_ids: Array, attention_mask: Optional[Array],
                    segment_ids: Optional[Array], positions: Optional[Array], decode: bool) -> tuple[Array, Array]:
  """(segment_ids, positions) [b, l] int32 of a model call, from whichever of them the caller gave.

  When decoding, default positions continue after the valid tokens already cached for each row (the module's
  `cache/valid_count`).
  """
  if segment_ids is None:
    segment_ids = jnp.ones_like(input_ids, jnp.int32) if attention_mask is None else attention_mask
  segment_ids = segment_ids.astype(jnp.int32)
  if positions is not None:
    return segment_ids, positions.astype(jnp.int32)
  if not decode:
    return segment_ids, segment_positions(segment_ids)
  valid = (segment_ids != 0).astype(jnp.int32)
  prior = module.variable("cache", "valid_count", jnp.zeros, segment_ids.shape[:1], jnp.int32)
  positions = jnp.maximum(prior.value[:, None] + jnp.cumsum(valid, axis=1) - 1, 0)
  if not module.is_initializing():
    prior.value = prior.value + valid.sum(axis=1)
  return segment_ids, positions


def visible(q_pos: Array, k_pos: Array, q_seg: Array, k_seg: Array, q_slot: Array, k_slot: Array,
            window: int = 0) -> Array:
  """[b, q, k] bool: a query sees keys of its own (non-zero) segment at the same or an earlier slot (and, with a
  sliding `window` > 0, fewer than `window` positions back). `q_slot` is [q] (one cache index for all rows) or
  [b, q] (a slot cache: every row at its own column)."""
  q_slot = q_slot if q_slot.ndim == 2 else q_slot[None]
  seen = ((q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
          & (k_slot[None, None, :] <= q_slot[:, :, None]))
  if window:
    seen &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
  return seen


def mask_bias(seen: Array) -> Array:
  """[b, q, k] bool -> float32 additive bias [b, 1, q, k] (0 or NEG_INF)."""
  return jnp.where(seen[:, None], 0.0, NEG_INF).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------ attention


def attention(q: Array, k: Array, v: Array, bias: Array, *, head_major: bool) -> Array:
  """Softmax(q k^T / sqrt(d) + bias) v with the softmax in float32, for h query heads over g key/value heads.

  Args:
    q: [b, q, h, d]; k, v: [b, k, g, d], or head-major [b, g, k, d] (a KV cache) with `head_major`.
    bias: float32 [b, h, q, k] or [b, 1, q, k] (the same for every head).

  Returns:
    [b, q, h, d].
  """
  b, lq, h, d = q.shape
  g = k.shape[1] if head_major else k.shape[2]
  kv = "bgkd" if head_major else "bkgd"
  grouped = q.reshape(b, lq, g, h // g, d)
  scores = jnp.einsum(f"bqgrd,{kv}->bgrqk", grouped, k, preferred_element_type=jnp.float32)
  lk = scores.shape[-1]
  bias = bias.reshape(b, g, h // g, lq, lk) if bias.shape[1] == h else bias[:, :, None]
  weights = jax.nn.softmax(scores / np.sqrt(d).astype(np.float32) + bias, axis=-1)
  out = jnp.einsum(f"bgrqk,{kv}->bqgrd", weights.astype(v.dtype), v)
  return out.reshape(b, lq, h, d)


def update_cache(module: nn.Module, k: Array, v: Array, positions: Array, segment_ids: Array
                 ) -> tuple[Array, Array, Array, Array, Array]:
  """Writes this call's l keys/values [b, l, g, d] at the cache index of `module`'s `cache` collection.

  Returns:
    keys and values [b, g, s, d], positions and segment ids [b, s] of the whole cache, and the query slots [l].
  """
  b, l, g, d = k.shape
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  cached_key = module.variable("cache", "key", jnp.zeros, (b, g, l, d), k.dtype)
  cached_value = module.variable("cache", "value", jnp.zeros, (b, g, l, d), v.dtype)
  cached_pos = module.variable("cache", "positions", jnp.zeros, (b, l), jnp.int32)
  cached_seg = module.variable("cache", "segment_ids", jnp.zeros, (b, l), jnp.int32)
  index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
  if module.is_initializing():  # init only sizes the cache: its length is the length of the init input
    return k, v, positions, segment_ids, jnp.arange(l, dtype=jnp.int32)
  i = index.value
  cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype), (0, 0, i, 0))
  cached_value.value = jax.lax.dynamic_update_slice(
      cached_value.value, v.astype(cached_value.value.dtype), (0, 0, i, 0))
  cached_pos.value = jax.lax.dynamic_update_slice(cached_pos.value, positions.astype(jnp.int32), (0, i))
  cached_seg.value = jax.lax.dynamic_update_slice(cached_seg.value, segment_ids.astype(jnp.int32), (0, i))
  index.value = i + l
  key = nn.with_logical_constraint(cached_key.value, CACHE_LOGICAL_AXES["key"])
  value = nn.with_logical_constraint(cached_value.value, CACHE_LOGICAL_AXES["value"])
  return key, value, cached_pos.value, cached_seg.value, i + jnp.arange(l, dtype=jnp.int32)


def self_attention(module: nn.Module, q: Array, k: Array, v: Array, positions: Array, segment_ids: Array,
                   decode: bool, bias_fn: Callable[[Array, Array, Array, Array], Array]) -> Array:
  """Attention of this call's queries over its own keys, or (decode) over the cache after writing them into it.

  Args:
    q [b, l, h, d], k and v [b, l, g, d]; positions, segment_ids [b, l].
    bias_fn: (q_pos [b, q], k_pos [b, k], seen [b, q, k] bool) -> float32 bias [b, h or 1, q, k], masking
      included (`masking_only`, or ALiBi).
  """
  if decode and is_slot_cache(module):
    return slot_attention(module, q, k, v, positions, segment_ids, bias_fn)
  if decode:
    k, v, k_pos, k_seg, q_slot = update_cache(module, k, v, positions, segment_ids)
    k_slot = jnp.arange(k.shape[2], dtype=jnp.int32)
  else:
    k_pos, k_seg = positions, segment_ids
    q_slot = k_slot = jnp.arange(q.shape[1], dtype=jnp.int32)
  seen = visible(positions, k_pos, segment_ids, k_seg, q_slot, k_slot, getattr(module.config, "sliding_window", 0))
  out = attention(q, k, v, bias_fn(positions, k_pos, seen), head_major=decode)
  return nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))


def is_slot_cache(module: nn.Module) -> bool:
  """Whether `module`'s cache is a slot cache (per-tier key tuples, per-row index; see the module docstring)."""
  return module.has_variable("cache", "key") and isinstance(module.get_variable("cache", "key"), (tuple, list))


def _write_rows(cache: Array, new: Array, column: Array, write: Array) -> Array:
  """cache [n, ..., s, ...] with `new` [n, ...] written at column[i] of row i where write[i] (the length axis is the
  third for keys / values [n, g, s, d], the second for [n, s])."""
  rows = jnp.arange(cache.shape[0])
  if cache.ndim == 4:
    old = cache[rows, :, column]
    return cache.at[rows, :, column].set(jnp.where(write[:, None, None], new.astype(cache.dtype), old))
  old = cache[rows, column]
  return cache.at[rows, column].set(jnp.where(write, new.astype(cache.dtype), old))


def slot_attention(module: nn.Module, q: Array, k: Array, v: Array, positions: Array, segment_ids: Array,
                   bias_fn: Callable[[Array, Array, Array, Array], Array]) -> Array:
  """One decoding step over a slot cache: every row writes its key/value at its own `index` (if its token's segment
  is not 0) and attends over its tier's cache, up to that column.

  Args:
    q [b, 1, h, d], k and v [b, 1, g, d]; positions, segment_ids [b, 1]; bias_fn as `self_attention`'s.
  """
  keys, values = module.get_variable("cache", "key"), module.get_variable("cache", "value")
  cached_pos, cached_seg = module.get_variable("cache", "positions"), module.get_variable("cache", "segment_ids")
  index = module.get_variable("cache", "index")
  write = segment_ids[:, 0] != 0
  outs, new = [], {"key": [], "value": [], "positions": [], "segment_ids": []}
  start = 0
  for tier_k, tier_v, tier_pos, tier_seg in zip(keys, values, cached_pos, cached_seg):
    rows = slice(start, start + tier_k.shape[0])
    start = rows.stop
    column = jnp.minimum(index[rows], tier_k.shape[2] - 1)
    tier = {"key": _write_rows(tier_k, k[rows, 0], column, write[rows]),
            "value": _write_rows(tier_v, v[rows, 0], column, write[rows]),
            "positions": _write_rows(tier_pos, positions[rows, 0], column, write[rows]),
            "segment_ids": _write_rows(tier_seg, segment_ids[rows, 0], column, write[rows])}
    tier["key"] = nn.with_logical_constraint(tier["key"], CACHE_LOGICAL_AXES["key"])
    tier["value"] = nn.with_logical_constraint(tier["value"], CACHE_LOGICAL_AXES["value"])
    for name, array in tier.items():
      new[name].append(array)
    k_slot = jnp.arange(tier_k.shape[2], dtype=jnp.int32)
    seen = visible(positions[rows], tier["positions"], segment_ids[rows], tier["segment_ids"], column[:, None],
                   k_slot, getattr(module.config, "sliding_window", 0))
    outs.append(attention(q[rows], tier["key"], tier["value"], bias_fn(positions[rows], tier["positions"], seen),
                          head_major=True))
  for name, arrays in new.items():
    module.put_variable("cache", name, tuple(arrays))
  module.put_variable("cache", "index", index + write.astype(index.dtype))
  out = jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
  return nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))


def masking_only(q_pos: Array, k_pos: Array, seen: Array) -> Array:
  """The `bias_fn` of a family without attention biases (learned or rotary positions)."""
  del q_pos, k_pos
  return mask_bias(seen)


# ------------------------------------------------------------------------------------------------ modules


def param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[Optional[str], ...],
          dtype: str) -> Array:
  """A parameter with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(dtype))


def dense(module: nn.Module, x: Array, name: str, shape: tuple[int, ...], axes: tuple[Optional[str], ...],
          equation: str, bias: bool) -> Array:
  """einsum(equation, x, kernel) (+ bias over the output dims), kernel of `shape` with logical `axes`; the bias
  takes the kernel's trailing dims after the contracted input ones (those named in x's part of the equation)."""
  cfg = module.config
  kernel = param(module, f"{name}_kernel", nn.initializers.normal(cfg.initializer_range), shape, axes,
                 cfg.param_dtype)
  y = jnp.einsum(equation, x, kernel.astype(cfg.dtype))
  if not bias:
    return y
  contracted = len(set(equation.split(",")[0]) & set(equation.split(",")[1].split("->")[0]))
  b = param(module, f"{name}_bias", nn.initializers.zeros, shape[contracted:], axes[contracted:], cfg.param_dtype)
  return y + b.astype(cfg.dtype)


def layer_norm(config: Any, name: str, epsilon: float) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=epsilon, dtype=config.dtype, param_dtype=config.param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale, computed in float32 and cast back (as Hugging Face's Llama family)."""

  config: Any
  epsilon: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",), self.config.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return scale.astype(self.config.dtype) * normed.astype(self.config.dtype)


def stack_layers(module: nn.Module, block: type, config: Any, layers_name: str, x: Array, positions: Array,
                 segment_ids: Array, decode: bool) -> Array:
  """Runs `config.num_layers` blocks (`block(config)(x, positions, segment_ids, decode) -> (x, None)`) over x:
  wrapped in `nn.remat` with the configured policy and in `nn.scan` (params and cache get a leading `layers` axis,
  under `layers_name`) as the config asks, else as modules `layers_name_0` ... `layers_name_{n-1}`."""
  if config.remat_policy != "none":
    block = nn.remat(block, policy=REMAT_POLICIES[config.remat_policy], prevent_cse=not config.scan_layers,
                     static_argnums=(4,))
  if config.scan_layers:
    block = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=config.num_layers,
                    unroll=config.scan_unroll, metadata_params={nn.PARTITION_NAME: "layers"})
    return block(config, name=layers_name)(x, positions, segment_ids, decode)[0]
  for i in range(config.num_layers):
    x, _ = block(config, name=f"{layers_name}_{i}")(x, positions, segment_ids, decode)
  return x


def embed(module: nn.Module, input_ids: Array, name: str, vocab_size: int, width: int) -> tuple[Array, Array]:
  """(embeddings [b, l, width] in the compute dtype, the embedding table [v, width])."""
  cfg = module.config
  table = param(module, name, nn.initializers.normal(cfg.initializer_range), (vocab_size, width),
                ("vocab", "embed"), cfg.param_dtype)
  return jnp.take(table, input_ids, axis=0).astype(cfg.dtype), table


def lm_head(config: Any, hidden: Array, head_kernel: Array) -> Array:
  """Logits [b, l, v] (in `config.logits_dtype`) of hidden states [b, l, e]; head_kernel [e, v] (the transposed
  embedding matrix of a tied head)."""
  logits = jnp.einsum("ble,ev->blv", hidden, head_kernel.astype(config.dtype), preferred_element_type=jnp.float32)
  logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
  return logits.astype(config.logits_dtype)


# ------------------------------------------------------------------------------------------------ params


def init_params(model: nn.Module, rng: Array, batch_size: int = 1, length: int = 8) -> dict:
  """Freshly initialised params (boxed with logical axis metadata; `nn.unbox` them for plain arrays)."""
  tokens = jnp.zeros((batch_size, length), jnp.int32)
  return model.init(rng, tokens)["params"]


def init_cache(model: nn.Module, batch_size: int, max_length: int) -> dict:
  """An empty KV cache for `batch_size` rows of up to `max_length` tokens (shapes only: no params are computed)."""
  tokens = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(functools.partial(model.init, decode=True), jax.random.key(0), tokens)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes))


def count_params(params: Any) -> int:
  """Number of scalar parameters in a (possibly boxed or abstract) params tree (inside a mesh context too)."""
  boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
  leaves = jax.tree.leaves(jax.tree.map(lambda x: x.unbox(apply_constraint=False) if boxed(x) else x, params,
                                        is_leaf=boxed))
  return sum(int(np.prod(x.shape)) for x in leaves)


def relayout_layers(params: dict, num_layers: int, *, scan_layers: bool, name: str) -> dict:
  """Converts params between the scanned layout (`name`, leaves [n, ...]) and the per-layer one
  (`name_0` ... `name_{n-1}`)."""
  params = dict(params)
  if scan_layers and name not in params:
    layers = [params.pop(f"{name}_{i}") for i in range(num_layers)]
    params[name] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)
  elif not scan_layers and name in params:
    stacked = params.pop(name)
    params.update({f"{name}_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(num_layers)})
  return params


def training_flops_per_token(config: Any, params: int, lookup_params: int, sequence_length: int) -> float:
  """Training FLOPs per token: 6 x the params used in matmuls (all but `lookup_params`, tables only indexed:
  an untied input embedding, learned positions) plus the attention matmuls (PaLM, appendix B), per query head."""
  attention = 12 * config.num_layers * config.num_heads * config.head_dim * sequence_length
  return 6 * (params - lookup_params) + attention


def hf_field(hf_config: dict, *keys: str) -> Any:
  """The first of `keys` set in a Hugging Face config dict (families and versions name some fields differently)."""
  for key in keys:
    if hf_config.get(key) is not None:
      return hf_config[key]
  raise ValueError(f"none of the fields {keys} is set")
