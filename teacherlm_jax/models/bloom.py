"""BLOOM decoder-only transformer in Flax (linen), with logical-axis partitioning.

Architecture (Le Scao et al., 2022; Hugging Face `BloomForCausalLM`):
  word embeddings -> embedding LayerNorm -> N x pre-LN block -> final LayerNorm -> LM head tied to the embeddings.
  block: x + Dense(Attention(LN(x))), then x + MLP(LN(x)); attention with a fused QKV projection laid out per head
  as [heads, 3, head_dim] (BLOOM's layout), ALiBi biases instead of position embeddings, GeLU (tanh) MLP of 4x width.

Shapes use: b = batch, l = length of this call, s = cache length, e = hidden_size, h = heads, d = head_dim,
m = mlp_dim, v = vocab_size, n = num_layers.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `layers`); main activations are
constrained with (`batch`, `length`, ...). `teacherlm_jax.partitioning` maps them onto the mesh axes.

Sequences: `segment_ids` (0 = padding, packed examples get 1, 2, ...) and `positions` (position within a segment)
describe packed and padded batches; `attention_mask` (1 = token, 0 = pad, left or right padding, Hugging Face style)
is the shorthand for one segment per row. ALiBi uses positions within the segment, so a left-padded row gets the same
logits as the unpadded one.

Incremental decoding: `decode=True` writes this call's keys and values into a `cache` collection of length s (made
by `init_cache`; keys and values head-major, [b, h, s, d]) at the running cache index, and attends to every valid
cached slot, so one call can prefill a whole prompt and later calls add one token each.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

Array = jax.Array
NEG_INF = -1e30  # finite, so rows whose keys are all masked (pad queries) stay finite

REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class BloomConfig:
  """Hyper-parameters of a BLOOM model.

  Attributes:
    vocab_size: rows of the (tied) embedding matrix.
    hidden_size: model width e.
    num_layers: number of transformer blocks n.
    num_heads: attention heads h; head_dim = hidden_size // num_heads.
    layer_norm_epsilon: epsilon of every LayerNorm.
    dtype: compute dtype of activations and matmuls (e.g. "bfloat16").
    param_dtype: storage dtype of parameters (normally "float32").
    logits_dtype: dtype of the returned logits.
    scan_layers: stack the blocks with `nn.scan` (params get a leading `layers` axis) instead of n separate modules.
    scan_unroll: layers per scan iteration (1 = a loop; num_layers = fully unrolled, faster on CPU, slower to
      compile); the params layout does not change.
    remat_policy: "none" or a key of `REMAT_POLICIES`: what the backward pass may keep instead of recomputing.
    initializer_range: std of the normal initializer of kernels and embeddings.
  """

  vocab_size: int = 250880
  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  layer_norm_epsilon: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"
  logits_dtype: str = "float32"
  scan_layers: bool = True
  scan_unroll: int = 1
  remat_policy: str = "none"
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    if self.remat_policy != "none" and self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; expected 'none' or one of {sorted(REMAT_POLICIES)}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return 4 * self.hidden_size

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "BloomConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
      raise ValueError(f"unknown BloomConfig fields {sorted(unknown)}")
    return cls(**values)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi head slopes [h] (Press et al., 2022), as BLOOM computes them.

  For a power of two n the slopes are 2^(-8/n), 2^(-16/n), ...; otherwise the closest lower power of two p gets
  those slopes and the remaining n - p heads take every other slope of the 2p sequence.
  """
  closest = 2 ** math.floor(math.log2(num_heads))
  base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
  slopes = [base**i for i in range(1, closest + 1)]
  if closest != num_heads:
    extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
    remaining = min(closest, num_heads - closest)
    slopes += [extra_base**i for i in range(1, 2 * remaining, 2)]
  return np.asarray(slopes, dtype=np.float32)


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


def attention_bias(q_pos: Array, k_pos: Array, q_seg: Array, k_seg: Array, q_slot: Array, k_slot: Array,
                   slopes: Array) -> Array:
  """ALiBi plus masking, float32 [b, h, q, k].

  A query attends to keys of its own (non-zero) segment at the same or an earlier slot. ALiBi adds
  slope * (k_pos - q_pos), which differs from BLOOM's slope * k_pos by a constant per query row, so the softmax
  is the same.

  Args:
    q_pos, q_seg: [b, q] positions and segment ids of the queries; k_pos, k_seg: [b, k] of the keys.
    q_slot: [q] and k_slot: [k] absolute indices in the sequence or cache, for causality.
    slopes: [h] ALiBi slopes.
  """
  visible = ((q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
             & (k_slot[None, None, :] <= q_slot[None, :, None]))
  distance = (k_pos[:, None, :] - q_pos[:, :, None]).astype(jnp.float32)
  bias = slopes[None, :, None, None] * distance[:, None]
  return jnp.where(visible[:, None], bias, NEG_INF)


def dot_product_attention(q: Array, k: Array, v: Array, bias: Array) -> Array:
  """Softmax(q k^T / sqrt(d) + bias) v with the softmax in float32. q [b, q, h, d]; k, v [b, k, h, d] -> [b, q, h, d]."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(scores / np.sqrt(q.shape[-1]).astype(np.float32) + bias, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def cached_dot_product_attention(q: Array, k: Array, v: Array, bias: Array) -> Array:
  """`dot_product_attention` over a head-major cache: q [b, q, h, d]; k, v [b, h, k, d] -> [b, q, h, d]."""
  scores = jnp.einsum("bqhd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(scores / np.sqrt(q.shape[-1]).astype(np.float32) + bias, axis=-1)
  return jnp.einsum("bhqk,bhkd->bqhd", weights.astype(v.dtype), v)


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[Optional[str], ...],
           dtype: str) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(dtype))


def _layer_norm(config: BloomConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_epsilon, dtype=config.dtype, param_dtype=config.param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class Attention(nn.Module):
  """Multi-head self-attention with BLOOM's fused QKV, ALiBi, and an optional KV cache."""

  config: BloomConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array, decode: bool) -> Array:
    """x [b, l, e], positions/segment_ids [b, l] -> [b, l, e]."""
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    e, h, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    qkv_kernel = _param(self, "qkv_kernel", init, (e, h, 3, d), ("embed", "heads", None, "kv"), cfg.param_dtype)
    qkv_bias = _param(self, "qkv_bias", nn.initializers.zeros, (h, 3, d), ("heads", None, "kv"), cfg.param_dtype)
    qkv = jnp.einsum("ble,ehtd->blhtd", x, qkv_kernel.astype(cfg.dtype)) + qkv_bias.astype(cfg.dtype)
    qkv = nn.with_logical_constraint(qkv, ("batch", "length", "heads", None, "kv"))
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]

    slopes = jnp.asarray(alibi_slopes(h))
    if decode:
      k, v, k_pos, k_seg, q_slot = self._update_cache(k, v, positions, segment_ids)
      bias = attention_bias(positions, k_pos, segment_ids, k_seg, q_slot, jnp.arange(k.shape[2], dtype=jnp.int32),
                            slopes)
      out = cached_dot_product_attention(q, k, v, bias)
    else:
      slots = jnp.arange(x.shape[1], dtype=jnp.int32)
      bias = attention_bias(positions, positions, segment_ids, segment_ids, slots, slots, slopes)
      out = dot_product_attention(q, k, v, bias)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))

    dense_kernel = _param(self, "dense_kernel", init, (h, d, e), ("heads", "kv", "embed"), cfg.param_dtype)
    dense_bias = _param(self, "dense_bias", nn.initializers.zeros, (e,), ("embed",), cfg.param_dtype)
    return jnp.einsum("blhd,hde->ble", out, dense_kernel.astype(cfg.dtype)) + dense_bias.astype(cfg.dtype)

  def _update_cache(self, k: Array, v: Array, positions: Array, segment_ids: Array):
    """Writes this call's l keys/values [b, l, h, d] at the cache index.

    The cache keeps keys and values head-major, [b, h, s, d], so that a decoding step's attention is a batched
    matmul over (b, h) that reads the cache in place (no transposed copy of it per step).

    Returns:
      keys and values [b, h, s, d], positions and segment ids [b, s] of the whole cache, and the query slots [l].
    """
    b, l, h, d = k.shape
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    cached_key = self.variable("cache", "key", jnp.zeros, (b, h, l, d), k.dtype)
    cached_value = self.variable("cache", "value", jnp.zeros, (b, h, l, d), v.dtype)
    cached_pos = self.variable("cache", "positions", jnp.zeros, (b, l), jnp.int32)
    cached_seg = self.variable("cache", "segment_ids", jnp.zeros, (b, l), jnp.int32)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if self.is_initializing():  # init only sizes the cache: its length is the length of the init input
      return k, v, positions, segment_ids, jnp.arange(l, dtype=jnp.int32)
    i = index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype), (0, 0, i, 0))
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, v.astype(cached_value.value.dtype), (0, 0, i, 0))
    cached_pos.value = jax.lax.dynamic_update_slice(cached_pos.value, positions.astype(jnp.int32), (0, i))
    cached_seg.value = jax.lax.dynamic_update_slice(cached_seg.value, segment_ids.astype(jnp.int32), (0, i))
    index.value = i + l
    key = nn.with_logical_constraint(cached_key.value, ("batch", "heads", "length", "kv"))
    value = nn.with_logical_constraint(cached_value.value, ("batch", "heads", "length", "kv"))
    return key, value, cached_pos.value, cached_seg.value, i + jnp.arange(l, dtype=jnp.int32)


class Mlp(nn.Module):
  """GeLU (tanh approximation) MLP e -> 4e -> e."""

  config: BloomConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    wi = _param(self, "wi_kernel", init, (cfg.hidden_size, cfg.mlp_dim), ("embed", "mlp"), cfg.param_dtype)
    wi_bias = _param(self, "wi_bias", nn.initializers.zeros, (cfg.mlp_dim,), ("mlp",), cfg.param_dtype)
    wo = _param(self, "wo_kernel", init, (cfg.mlp_dim, cfg.hidden_size), ("mlp", "embed"), cfg.param_dtype)
    wo_bias = _param(self, "wo_bias", nn.initializers.zeros, (cfg.hidden_size,), ("embed",), cfg.param_dtype)
    hidden = jax.nn.gelu(x @ wi.astype(cfg.dtype) + wi_bias.astype(cfg.dtype), approximate=True)
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    return hidden @ wo.astype(cfg.dtype) + wo_bias.astype(cfg.dtype)


class Block(nn.Module):
  """Pre-LN transformer block. Returns (x, None) so that it can be the body of `nn.scan`."""

  config: BloomConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array, decode: bool):
    cfg = self.config
    attn_in = _layer_norm(cfg, "input_layernorm")(x)
    x = x + Attention(cfg, name="self_attention")(attn_in, positions, segment_ids, decode)
    x = x + Mlp(cfg, name="mlp")(_layer_norm(cfg, "post_attention_layernorm")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


def _block_class(config: BloomConfig):
  """Block, wrapped in `nn.remat` (with the configured policy) and `nn.scan` as the config asks."""
  block = Block
  if config.remat_policy != "none":
    block = nn.remat(block, policy=REMAT_POLICIES[config.remat_policy], prevent_cse=not config.scan_layers,
                     static_argnums=(4,))
  if config.scan_layers:
    block = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=config.num_layers,
                    unroll=config.scan_unroll, metadata_params={nn.PARTITION_NAME: "layers"})
  return block


class Bloom(nn.Module):
  """BLOOM causal LM: token ids -> logits.

  Params: `word_embeddings` [v, e], `word_embeddings_layernorm`, `h` (scanned: every leaf has a leading [n] axis) or
  `h_0` ... `h_{n-1}`, and `ln_f`. The LM head is the transposed embedding matrix.
  """

  config: BloomConfig

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
               segment_ids: Optional[Array] = None, positions: Optional[Array] = None,
               decode: bool = False, last_only: bool = False, hidden_only: bool = False) -> Array:
    """Computes next-token logits.

    Args:
      input_ids: [b, l] int token ids.
      attention_mask: [b, l], 1 for tokens and 0 for padding (left or right); ignored if segment_ids is given.
      segment_ids: [b, l] for packed rows: 0 = padding, tokens of one example share an id.
      positions: [b, l] position of each token within its segment; derived from the segments when omitted (in
        decode mode: continuing after the valid tokens already in the cache).
      decode: use and update the `cache` collection (apply with `mutable=["cache"]`).
      last_only: compute the logits of the last position only (a prefill of left-padded prompts needs no more):
        the LM head, a large part of a small model's forward, then runs on one position per row.
      hidden_only: return the final hidden states (after `ln_f`) instead of logits, for a caller that applies the
        LM head itself (`lm_head`; decoding does, with the embedding transposed once outside its loop).

    Returns:
      logits [b, l, v] (or [b, 1, v] with last_only) in `config.logits_dtype`; with hidden_only, hidden states
      [b, l, e] (or [b, 1, e]) in `config.dtype`.
    """
    cfg = self.config
    if segment_ids is None:
      segment_ids = jnp.ones_like(input_ids, jnp.int32) if attention_mask is None else attention_mask
    segment_ids = segment_ids.astype(jnp.int32)
    if positions is None:
      positions = self._default_positions(segment_ids, decode)

    embedding = _param(self, "word_embeddings", nn.initializers.normal(cfg.initializer_range),
                       (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype)
    x = jnp.take(embedding, input_ids, axis=0).astype(cfg.dtype)
    x = _layer_norm(cfg, "word_embeddings_layernorm")(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    block = _block_class(cfg)
    if cfg.scan_layers:
      x, _ = block(cfg, name="h")(x, positions, segment_ids, decode)
    else:
      for i in range(cfg.num_layers):
        x, _ = block(cfg, name=f"h_{i}")(x, positions, segment_ids, decode)

    if last_only:
      x = x[:, -1:]
    x = _layer_norm(cfg, "ln_f")(x)
    if hidden_only:
      return x
    return lm_head(cfg, x, embedding.T)

  def _default_positions(self, segment_ids: Array, decode: bool) -> Array:
    """Positions within segments; when decoding, offset by the valid tokens already cached for each row."""
    if not decode:
      return segment_positions(segment_ids)
    valid = (segment_ids != 0).astype(jnp.int32)
    prior = self.variable("cache", "valid_count", jnp.zeros, segment_ids.shape[:1], jnp.int32)
    positions = jnp.maximum(prior.value[:, None] + jnp.cumsum(valid, axis=1) - 1, 0)
    if not self.is_initializing():
      prior.value = prior.value + valid.sum(axis=1)
    return positions


def lm_head(config: BloomConfig, hidden: Array, head_kernel: Array) -> Array:
  """Logits [b, l, v] (in `config.logits_dtype`) of hidden states [b, l, e]; head_kernel [e, v] is the transposed
  word embedding matrix (the head is tied)."""
  logits = jnp.einsum("ble,ev->blv", hidden, head_kernel.astype(config.dtype), preferred_element_type=jnp.float32)
  logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
  return logits.astype(config.logits_dtype)


def init_params(model: Bloom, rng: Array, batch_size: int = 1, length: int = 8) -> dict:
  """Freshly initialised params (boxed with logical axis metadata; `nn.unbox` them for plain arrays)."""
  tokens = jnp.zeros((batch_size, length), jnp.int32)
  return model.init(rng, tokens)["params"]


def init_cache(model: Bloom, batch_size: int, max_length: int) -> dict:
  """An empty KV cache for `batch_size` rows of up to `max_length` tokens (shapes only: no params are computed)."""
  tokens = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(functools.partial(model.init, decode=True), jax.random.key(0), tokens)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes))


def count_params(params: Any) -> int:
  """Number of scalar parameters in a (possibly boxed or abstract) params tree."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params)))


def relayout_layers(params: dict, num_layers: int, *, scan_layers: bool) -> dict:
  """Converts params between the scanned layout (`h`, leaves [n, ...]) and the per-layer one (`h_0`...`h_{n-1}`)."""
  params = dict(params)
  if scan_layers and "h" not in params:
    layers = [params.pop(f"h_{i}") for i in range(num_layers)]
    params["h"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)
  elif not scan_layers and "h" in params:
    stacked = params.pop("h")
    params.update({f"h_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(num_layers)})
  return params
