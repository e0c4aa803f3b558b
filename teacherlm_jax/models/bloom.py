"""BLOOM decoder-only transformer in Flax (linen), with logical-axis partitioning.

Architecture (Le Scao et al., 2022; Hugging Face `BloomForCausalLM`):
  word embeddings -> embedding LayerNorm -> N x pre-LN block -> final LayerNorm -> LM head tied to the embeddings.
  block: x + Dense(Attention(LN(x))), then x + MLP(LN(x)); attention with a fused QKV projection laid out per head
  as [heads, 3, head_dim] (BLOOM's layout), ALiBi biases instead of position embeddings, GeLU (tanh) MLP of 4x width.

Shapes use (as `models.common`): b = batch, l = length of this call, e = hidden_size, h = heads, d = head_dim,
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

Hugging Face layout (`BloomForCausalLM`; torch Linear weights are [out, in]; the `transformer.` prefix is optional):
  transformer.word_embeddings.weight [v, e]             -> word_embeddings [v, e]
  transformer.word_embeddings_layernorm, h.n.input_layernorm, h.n.post_attention_layernorm, ln_f: {weight, bias}
                                                        -> same names, {scale, bias}
  transformer.h.n.self_attention.query_key_value.weight [3e, e] (per head: q, k, v) -> h/self_attention/qkv_kernel
                                                           [e, h, 3, d]
  transformer.h.n.self_attention.dense.weight [e, e]    -> h/self_attention/dense_kernel [h, d, e]
  transformer.h.n.mlp.dense_h_to_4h.weight [4e, e]      -> h/mlp/wi_kernel [e, 4e]; dense_4h_to_h -> wo_kernel
  lm_head.weight                                        -> (tied to word_embeddings; must equal it if present)
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

from teacherlm_jax.models import common

Array = jax.Array
HF_MODEL_TYPES = ("bloom",)
HF_PREFIX = "transformer."
LAYERS = "h"


@dataclasses.dataclass(frozen=True)
class BloomConfig(common.ModelConfig):
  """Hyper-parameters of a BLOOM model (and `common.ModelConfig`'s dtypes, scan and remat fields).

  Attributes:
    vocab_size: rows of the (tied) embedding matrix.
    hidden_size: model width e.
    num_layers: number of transformer blocks n.
    num_heads: attention heads h; head_dim = hidden_size // num_heads.
    layer_norm_epsilon: epsilon of every LayerNorm.
  """

  vocab_size: int = 250880
  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  layer_norm_epsilon: float = 1e-5

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    super().__post_init__()

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_kv_heads(self) -> int:
    return self.num_heads

  @property
  def mlp_dim(self) -> int:
    return 4 * self.hidden_size


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


def alibi_bias(slopes: Array, q_pos: Array, k_pos: Array, seen: Array) -> Array:
  """ALiBi plus masking, float32 [b, h, q, k]: slope * (k_pos - q_pos) where `seen` [b, q, k], else -inf.

  This differs from BLOOM's slope * k_pos by a constant per query row, so the softmax is the same.
  """
  distance = (k_pos[:, None, :] - q_pos[:, :, None]).astype(jnp.float32)
  return jnp.where(seen[:, None], slopes[None, :, None, None] * distance[:, None], common.NEG_INF)


class Attention(nn.Module):
  """Multi-head self-attention with BLOOM's fused QKV, ALiBi, and an optional KV cache."""

  config: BloomConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array, decode: bool) -> Array:
    """x [b, l, e], positions/segment_ids [b, l] -> [b, l, e]."""
    e, h, d = self.config.hidden_size, self.config.num_heads, self.config.head_dim
    qkv = common.dense(self, x, "qkv", (e, h, 3, d), ("embed", "heads", None, "kv"), "ble,ehtd->blhtd", bias=True)
    qkv = nn.with_logical_constraint(qkv, ("batch", "length", "heads", None, "kv"))
    bias_fn = lambda q_pos, k_pos, seen: alibi_bias(jnp.asarray(alibi_slopes(h)), q_pos, k_pos, seen)  # noqa: E731
    out = common.self_attention(self, qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2], positions, segment_ids,
                                decode, bias_fn)
    return common.dense(self, out, "dense", (h, d, e), ("heads", "kv", "embed"), "blhd,hde->ble", bias=True)


class Mlp(nn.Module):
  """GeLU (tanh approximation) MLP e -> 4e -> e."""

  config: BloomConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    e, m = self.config.hidden_size, self.config.mlp_dim
    hidden = jax.nn.gelu(common.dense(self, x, "wi", (e, m), ("embed", "mlp"), "ble,em->blm", bias=True),
                         approximate=True)
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    return common.dense(self, hidden, "wo", (m, e), ("mlp", "embed"), "blm,me->ble", bias=True)


class Block(nn.Module):
  """Pre-LN transformer block. Returns (x, None) so that it can be the body of `nn.scan`."""

  config: BloomConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array, decode: bool):
    cfg, eps = self.config, self.config.layer_norm_epsilon
    attn_in = common.layer_norm(cfg, "input_layernorm", eps)(x)
    x = x + Attention(cfg, name="self_attention")(attn_in, positions, segment_ids, decode)
    x = x + Mlp(cfg, name="mlp")(common.layer_norm(cfg, "post_attention_layernorm", eps)(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


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
        LM head itself (`common.lm_head` with `head_kernel(params)`; decoding does, once outside its loop).

    Returns:
      logits [b, l, v] (or [b, 1, v] with last_only) in `config.logits_dtype`; with hidden_only, hidden states
      [b, l, e] (or [b, 1, e]) in `config.dtype`.
    """
    cfg = self.config
    segment_ids, positions = common.sequence_layout(self, input_ids, attention_mask, segment_ids, positions, decode)
    x, embedding = common.embed(self, input_ids, "word_embeddings", cfg.vocab_size, cfg.hidden_size)
    x = common.layer_norm(cfg, "word_embeddings_layernorm", cfg.layer_norm_epsilon)(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = common.stack_layers(self, Block, cfg, LAYERS, x, positions, segment_ids, decode)
    if last_only:
      x = x[:, -1:]
    x = common.layer_norm(cfg, "ln_f", cfg.layer_norm_epsilon)(x)
    if hidden_only:
      return x
    return common.lm_head(cfg, x, embedding.T)


def head_kernel(config: BloomConfig, params: dict) -> Array:
  """The LM head's kernel [e, v]: the transposed word embeddings (BLOOM ties them)."""
  del config
  return jnp.transpose(params["word_embeddings"])


def lookup_params(config: BloomConfig) -> int:
  """Params only indexed, never multiplied: none (the embedding is also the LM head)."""
  del config
  return 0


# ----------------------------------------------------------------------------------------------- Hugging Face


def config_from_hf(hf_config: dict, **overrides: Any) -> BloomConfig:
  """BloomConfig with the dimensions of an HF config (accepting BLOOM's older key names) plus `overrides`."""
  if hf_config.get("apply_residual_connection_post_layernorm"):
    raise ValueError("apply_residual_connection_post_layernorm=true is not supported")
  get = functools.partial(common.hf_field, hf_config)
  return BloomConfig(
      vocab_size=int(get("vocab_size")), hidden_size=int(get("n_embed", "hidden_size")),
      num_layers=int(get("n_layer", "num_hidden_layers")), num_heads=int(get("n_head", "num_attention_heads")),
      layer_norm_epsilon=float(hf_config.get("layer_norm_epsilon", 1e-5)),
      initializer_range=float(hf_config.get("initializer_range", 0.02)), **overrides)


def hf_config(config: BloomConfig, dtype: str, base: Optional[dict] = None) -> dict:
  """An HF `config.json` dict for `config`, keeping the other fields (token ids, ...) of `base` when given."""
  result = dict(base or {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "unk_token_id": 0,
                         "hidden_dropout": 0.0, "attention_dropout": 0.0, "use_cache": True,
                         "pretraining_tp": 1, "slow_but_exact": False})
  for old_key in ("n_embed", "num_attention_heads", "num_hidden_layers", "torch_dtype", "transformers_version"):
    result.pop(old_key, None)
  result.update(
      architectures=["BloomForCausalLM"], model_type="bloom", vocab_size=config.vocab_size,
      hidden_size=config.hidden_size, n_layer=config.num_layers, n_head=config.num_heads,
      layer_norm_epsilon=config.layer_norm_epsilon, initializer_range=config.initializer_range,
      apply_residual_connection_post_layernorm=False, tie_word_embeddings=True, dtype=dtype)
  return result


def tensor_mappings(config: BloomConfig) -> dict[str, common.TensorMapping]:
  """Every HF tensor name of a BLOOM model (with the `transformer.` prefix) -> its mapping."""
  e, h, d, v, m = config.hidden_size, config.num_heads, config.head_dim, config.vocab_size, config.mlp_dim
  same, t = common.identity, common.transpose
  mappings = {"transformer.word_embeddings.weight": common.TensorMapping(("word_embeddings",), None, (v, e), same,
                                                                         same)}
  for name in ("word_embeddings_layernorm", "ln_f"):
    mappings[f"transformer.{name}.weight"] = common.TensorMapping((name, "scale"), None, (e,), same, same)
    mappings[f"transformer.{name}.bias"] = common.TensorMapping((name, "bias"), None, (e,), same, same)
  per_layer = {
      "input_layernorm.weight": (("input_layernorm", "scale"), (e,), same, same),
      "input_layernorm.bias": (("input_layernorm", "bias"), (e,), same, same),
      "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), (e,), same, same),
      "post_attention_layernorm.bias": (("post_attention_layernorm", "bias"), (e,), same, same),
      "self_attention.query_key_value.weight": (
          ("self_attention", "qkv_kernel"), (3 * e, e), lambda x: x.T.reshape(e, h, 3, d),
          lambda x: x.reshape(e, 3 * e).T),
      "self_attention.query_key_value.bias": (
          ("self_attention", "qkv_bias"), (3 * e,), lambda x: x.reshape(h, 3, d), lambda x: x.reshape(3 * e)),
      "self_attention.dense.weight": (
          ("self_attention", "dense_kernel"), (e, e), lambda x: x.T.reshape(h, d, e), lambda x: x.reshape(e, e).T),
      "self_attention.dense.bias": (("self_attention", "dense_bias"), (e,), same, same),
      "mlp.dense_h_to_4h.weight": (("mlp", "wi_kernel"), (m, e), t, t),
      "mlp.dense_h_to_4h.bias": (("mlp", "wi_bias"), (m,), same, same),
      "mlp.dense_4h_to_h.weight": (("mlp", "wo_kernel"), (e, m), t, t),
      "mlp.dense_4h_to_h.bias": (("mlp", "wo_bias"), (e,), same, same),
  }
  mappings.update(common.layer_mappings(config, LAYERS, "transformer.h", per_layer))
  return mappings


def tied_head(config: BloomConfig) -> Optional[tuple[str, tuple[str, ...]]]:
  """(HF name of the LM head, params path of the embeddings it equals): BLOOM always ties them."""
  del config
  return "lm_head.weight", ("word_embeddings",)
