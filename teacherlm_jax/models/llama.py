"""The Llama family in Flax (linen), with logical-axis partitioning: Llama 2 / 3, Qwen2 / Qwen2.5 and Mistral.

Architecture (Touvron et al., 2023; Hugging Face `LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`):
  token embeddings -> N x pre-norm block -> RMSNorm -> LM head (its own matrix, or the embeddings when tied).
  block: x + Attention(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)), SwiGLU = down(silu(gate(x)) * up(x)).
  Attention: grouped-query (g key/value heads shared by h / g query heads each; g = h is multi-head), rotary
  position embeddings on q and k (`rope_theta`; Llama 3's `rope_scaling` of the frequencies), q/k/v biases for
  Qwen2 (`qkv_bias`), an optional sliding window (Mistral 7B v0.1: 4,096).
  The families differ only in their configs: Mistral is Llama with a sliding window, Qwen2 adds q/k/v biases.

Shapes use (as `models.common`): b = batch, l = length, e = hidden_size, h = heads, g = kv heads, d = head_dim,
m = mlp_dim, v = vocab_size, n = num_layers.

Params: `embed_tokens` [v, e], `layers` (scanned, leading [n] axis) or `layers_0` ... with `input_layernorm/scale`,
`self_attn/q_proj_kernel` [e, h, d], `self_attn/{k,v}_proj_kernel` [e, g, d] (+ `_bias` [h or g, d] with qkv_bias),
`self_attn/o_proj_kernel` [h, d, e], `post_attention_layernorm/scale`, `mlp/{gate,up}_proj_kernel` [e, m],
`mlp/down_proj_kernel` [m, e]; `norm/scale`; `lm_head` [e, v] unless tied. K/V projections and the KV cache carry
the logical axis `kv_heads` (sharded over `tensor` when g divides by it; see `partitioning`).

Positions count from each segment's first token; RoPE depends only on relative positions, so left-padded rows get the
unpadded logits (Hugging Face's plain forward numbers padded rows from the first pad instead: the same up to
rounding).

Hugging Face layout (torch Linear weights are [out, in]; the `model.` prefix is optional):
  model.embed_tokens.weight [v, e] -> embed_tokens; model.norm.weight -> norm/scale; lm_head.weight [v, e] -> [e, v]
  model.layers.n.self_attn.q_proj.weight [h*d, e] -> layers/self_attn/q_proj_kernel [e, h, d] (.bias [h*d] -> [h, d])
  model.layers.n.self_attn.{k,v}_proj.weight [g*d, e] -> layers/self_attn/{k,v}_proj_kernel [e, g, d]
  model.layers.n.self_attn.o_proj.weight [e, h*d] -> layers/self_attn/o_proj_kernel [h, d, e]
  model.layers.n.mlp.{gate,up}_proj.weight [m, e] -> [e, m]; mlp.down_proj.weight [e, m] -> [m, e]
  model.layers.n.{input_layernorm, post_attention_layernorm}.weight -> same names, scale
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from teacherlm_jax.models import common

Array = jax.Array
HF_MODEL_TYPES = ("llama", "qwen2", "mistral")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
HF_PREFIX = "model."
LAYERS = "layers"
ROPE_SCALING_TYPES = ("none", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(common.ModelConfig):
  """Hyper-parameters of a Llama-family model (and `common.ModelConfig`'s dtypes, scan and remat fields).

  Attributes:
    vocab_size, hidden_size (e), num_layers (n), num_heads (h), mlp_dim (m, HF's intermediate_size).
    num_kv_heads: key/value heads g (grouped-query attention; h % g == 0); 0 = num_heads.
    head_dim: d; 0 = hidden_size // num_heads (some models, e.g. Gemma-like configs, set it explicitly).
    rms_norm_epsilon: epsilon of every RMSNorm.
    rope_theta: RoPE base frequency (10,000 Llama 2 / Mistral; 500,000 Llama 3; 1,000,000 Qwen2.5).
    rope_scaling_type: "none", "linear" (positions divided by the factor) or "llama3" (Llama 3.1's frequency-band
      scaling with rope_scaling_factor, rope_low_freq_factor, rope_high_freq_factor and
      rope_original_max_positions).
    qkv_bias: q/k/v projections have biases (Qwen2).
    tie_word_embeddings: the LM head is the transposed token embedding matrix (Llama 3.2 1B, Qwen2.5 0.5B).
    sliding_window: a query attends to at most this many positions back, itself included (0 = no window).
    max_position_embeddings: the context length the model was trained for (recorded for export).
    hf_model_type: "llama", "qwen2" or "mistral": which Hugging Face class an export is for.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 0
  head_dim: int = 0
  mlp_dim: int = 11008
  rms_norm_epsilon: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling_type: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  qkv_bias: bool = False
  tie_word_embeddings: bool = False
  sliding_window: int = 0
  max_position_embeddings: int = 4096
  hf_model_type: str = "llama"

  def __post_init__(self):
    if not self.num_kv_heads:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if not self.head_dim:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set "
                         "head_dim")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads} (each "
                       "key/value head serves the same number of query heads)")
    if self.rope_scaling_type not in ROPE_SCALING_TYPES:
      raise ValueError(f"rope_scaling_type={self.rope_scaling_type!r}; expected one of {ROPE_SCALING_TYPES}")
    if self.hf_model_type not in HF_MODEL_TYPES:
      raise ValueError(f"hf_model_type={self.hf_model_type!r}; expected one of {HF_MODEL_TYPES}")
    super().__post_init__()


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
  """RoPE inverse frequencies [d / 2] (float32), with the configured scaling, as Hugging Face computes them."""
  d = config.head_dim
  inv_freq = (1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))).astype(
      np.float32)
  if config.rope_scaling_type == "linear":
    return (inv_freq / config.rope_scaling_factor).astype(np.float32)
  if config.rope_scaling_type == "llama3":
    factor, old_context = config.rope_scaling_factor, config.rope_original_max_positions
    low_wavelen = old_context / config.rope_low_freq_factor
    high_wavelen = old_context / config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """Rotates x [b, l, heads, d] by its positions [b, l] (the half-split layout of Hugging Face's `rotate_half`)."""
  angles = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]  # [b, l, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE and an optional KV cache (of the g key/value heads only)."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array, decode: bool) -> Array:
    cfg = self.config
    e, h, g, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = common.dense(self, x, "q_proj", (e, h, d), ("embed", "heads", "kv"), "ble,ehd->blhd", bias=cfg.qkv_bias)
    k = common.dense(self, x, "k_proj", (e, g, d), ("embed", "kv_heads", "kv"), "ble,egd->blgd", bias=cfg.qkv_bias)
    v = common.dense(self, x, "v_proj", (e, g, d), ("embed", "kv_heads", "kv"), "ble,egd->blgd", bias=cfg.qkv_bias)
    inv_freq = rope_frequencies(cfg)
    q = nn.with_logical_constraint(apply_rope(q, positions, inv_freq), ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(apply_rope(k, positions, inv_freq), ("batch", "length", "kv_heads", "kv"))
    out = common.self_attention(self, q, k, v, positions, segment_ids, decode, common.masking_only)
    return common.dense(self, out, "o_proj", (h, d, e), ("heads", "kv", "embed"), "blhd,hde->ble", bias=False)


class Mlp(nn.Module):
  """SwiGLU MLP: down(silu(gate(x)) * up(x)), e -> m -> e, no biases."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    e, m = self.config.hidden_size, self.config.mlp_dim
    gate = common.dense(self, x, "gate_proj", (e, m), ("embed", "mlp"), "ble,em->blm", bias=False)
    up = common.dense(self, x, "up_proj", (e, m), ("embed", "mlp"), "ble,em->blm", bias=False)
    hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return common.dense(self, hidden, "down_proj", (m, e), ("mlp", "embed"), "blm,me->ble", bias=False)


class Block(nn.Module):
  """Pre-norm decoder layer. Returns (x, None) so that it can be the body of `nn.scan`."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array, decode: bool):
    cfg, eps = self.config, self.config.rms_norm_epsilon
    x = x + Attention(cfg, name="self_attn")(common.RMSNorm(cfg, eps, name="input_layernorm")(x), positions,
                                             segment_ids, decode)
    x = x + Mlp(cfg, name="mlp")(common.RMSNorm(cfg, eps, name="post_attention_layernorm")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class Llama(nn.Module):
  """Llama-family causal LM: token ids -> logits, with the call signature of `bloom.Bloom` (see there)."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
               segment_ids: Optional[Array] = None, positions: Optional[Array] = None,
               decode: bool = False, last_only: bool = False, hidden_only: bool = False) -> Array:
    cfg = self.config
    segment_ids, positions = common.sequence_layout(self, input_ids, attention_mask, segment_ids, positions, decode)
    x, embedding = common.embed(self, input_ids, "embed_tokens", cfg.vocab_size, cfg.hidden_size)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = common.stack_layers(self, Block, cfg, LAYERS, x, positions, segment_ids, decode)
    if last_only:
      x = x[:, -1:]
    x = common.RMSNorm(cfg, cfg.rms_norm_epsilon, name="norm")(x)
    if cfg.tie_word_embeddings:
      kernel = embedding.T
    else:
      kernel = common.param(self, "lm_head", nn.initializers.normal(cfg.initializer_range),
                            (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype)
    if hidden_only:
      return x
    return common.lm_head(cfg, x, kernel)


def head_kernel(config: LlamaConfig, params: dict) -> Array:
  """The LM head's kernel [e, v]: `lm_head`, or the transposed token embeddings when tied."""
  return jnp.transpose(params["embed_tokens"]) if config.tie_word_embeddings else params["lm_head"]


def lookup_params(config: LlamaConfig) -> int:
  """Params only indexed, never multiplied: the token embeddings, unless they are also the LM head."""
  return 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size


# ----------------------------------------------------------------------------------------------- Hugging Face


def _rope_settings(hf_config: dict) -> dict[str, Any]:
  """LlamaConfig's RoPE fields from an HF config: `rope_theta` + `rope_scaling` (transformers 4) or
  `rope_parameters` (transformers 5)."""
  parameters = dict(hf_config.get("rope_parameters") or {})
  scaling = dict(hf_config.get("rope_scaling") or parameters)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  theta = hf_config.get("rope_theta", parameters.get("rope_theta", 10000.0))
  settings: dict[str, Any] = {"rope_theta": float(theta)}
  if kind in ("default", None):
    return settings
  if kind not in ("linear", "llama3"):
    raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")
  def field(key: str) -> Any:
    if key not in scaling:
      raise ValueError(f"rope scaling {kind!r} needs {key!r} (rope_scaling / rope_parameters: {scaling})")
    return scaling[key]
  settings.update(rope_scaling_type=kind, rope_scaling_factor=float(field("factor")))
  if kind == "llama3":
    settings.update(rope_low_freq_factor=float(field("low_freq_factor")),
                    rope_high_freq_factor=float(field("high_freq_factor")),
                    rope_original_max_positions=int(field("original_max_position_embeddings")))
  return settings


def _sliding_window(hf_config: dict, model_type: str) -> int:
  if model_type == "qwen2" and not hf_config.get("use_sliding_window"):
    return 0  # Qwen2 configs carry a sliding_window value that is only used with use_sliding_window
  return int(hf_config.get("sliding_window") or 0)


def config_from_hf(hf_config: dict, **overrides: Any) -> LlamaConfig:
  """LlamaConfig with the dimensions of an HF Llama / Qwen2 / Mistral config dict plus `overrides`."""
  model_type = hf_config.get("model_type", "llama")
  for key in ("attention_bias", "mlp_bias"):
    if hf_config.get(key):
      raise ValueError(f"{key}=true is not supported (Llama-family checkpoints without biases, or Qwen2's q/k/v "
                       "biases)")
  if hf_config.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf_config['hidden_act']!r} is not supported (the Llama family uses silu)")
  get = functools.partial(common.hf_field, hf_config)
  heads = int(get("num_attention_heads"))
  return LlamaConfig(
      vocab_size=int(get("vocab_size")), hidden_size=int(get("hidden_size")), num_layers=int(get("num_hidden_layers")),
      num_heads=heads, num_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
      head_dim=int(hf_config.get("head_dim") or 0), mlp_dim=int(get("intermediate_size")),
      rms_norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)), qkv_bias=model_type == "qwen2",
      tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
      sliding_window=_sliding_window(hf_config, model_type),
      max_position_embeddings=int(hf_config.get("max_position_embeddings", 4096)), hf_model_type=model_type,
      initializer_range=float(hf_config.get("initializer_range", 0.02)), **_rope_settings(hf_config), **overrides)


def _hf_rope_scaling(config: LlamaConfig) -> Optional[dict]:
  if config.rope_scaling_type == "none":
    return None
  scaling = {"rope_type": config.rope_scaling_type, "factor": config.rope_scaling_factor}
  if config.rope_scaling_type == "llama3":
    scaling.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                   original_max_position_embeddings=config.rope_original_max_positions)
  return scaling


def hf_config(config: LlamaConfig, dtype: str, base: Optional[dict] = None) -> dict:
  """An HF `config.json` dict for `config` (Llama, Qwen2 or Mistral as `hf_model_type` says), keeping the other
  fields (token ids, ...) of `base` when given."""
  result = dict(base or {"bos_token_id": 1, "eos_token_id": 2, "attention_dropout": 0.0, "use_cache": True})
  for old_key in ("torch_dtype", "transformers_version", "rope_parameters", "rope_scaling", "rope_theta"):
    result.pop(old_key, None)
  scaling = _hf_rope_scaling(config)
  result.update(
      architectures=[HF_ARCHITECTURES[config.hf_model_type]], model_type=config.hf_model_type,
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
      intermediate_size=config.mlp_dim, rms_norm_eps=config.rms_norm_epsilon, hidden_act="silu",
      max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
      initializer_range=config.initializer_range, dtype=dtype,
      rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, **(scaling or {})})
  if config.hf_model_type == "llama":
    result.update(attention_bias=False, mlp_bias=False)
  if config.hf_model_type == "qwen2":
    result.update(use_sliding_window=bool(config.sliding_window), sliding_window=config.sliding_window or None)
  if config.hf_model_type == "mistral":
    result.update(sliding_window=config.sliding_window or None)
  return result


def tensor_mappings(config: LlamaConfig) -> dict[str, common.TensorMapping]:
  """Every HF tensor name of a Llama-family model (with the `model.` prefix) -> its mapping."""
  e, h, g, d, m, v = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, config.mlp_dim,
                      config.vocab_size)
  same, t, leaf = common.identity, common.transpose, common.TensorMapping
  mappings = {"model.embed_tokens.weight": leaf(("embed_tokens",), None, (v, e), same, same),
              "model.norm.weight": leaf(("norm", "scale"), None, (e,), same, same)}
  if not config.tie_word_embeddings:
    mappings["lm_head.weight"] = leaf(("lm_head",), None, (v, e), t, t)
  per_layer = {}
  for name, heads in (("q_proj", h), ("k_proj", g), ("v_proj", g)):
    per_layer[f"self_attn.{name}.weight"] = (
        ("self_attn", f"{name}_kernel"), (heads * d, e), lambda x, n=heads: x.T.reshape(e, n, d),
        lambda x, n=heads: x.reshape(e, n * d).T)
    if config.qkv_bias:
      per_layer[f"self_attn.{name}.bias"] = (("self_attn", f"{name}_bias"), (heads * d,),
                                             lambda x, n=heads: x.reshape(n, d), lambda x, n=heads: x.reshape(n * d))
  per_layer["self_attn.o_proj.weight"] = (("self_attn", "o_proj_kernel"), (e, h * d),
                                          lambda x: x.T.reshape(h, d, e), lambda x: x.reshape(h * d, e).T)
  for name in ("gate_proj", "up_proj"):
    per_layer[f"mlp.{name}.weight"] = (("mlp", f"{name}_kernel"), (m, e), t, t)
  per_layer["mlp.down_proj.weight"] = (("mlp", "down_proj_kernel"), (e, m), t, t)
  for name in ("input_layernorm", "post_attention_layernorm"):
    per_layer[f"{name}.weight"] = ((name, "scale"), (e,), same, same)
  mappings.update(common.layer_mappings(config, LAYERS, "model.layers", per_layer))
  return mappings


def tied_head(config: LlamaConfig) -> Optional[tuple[str, tuple[str, ...]]]:
  """(HF name of the LM head, params path of the embeddings it equals) when tied, else None."""
  return ("lm_head.weight", ("embed_tokens",)) if config.tie_word_embeddings else None
