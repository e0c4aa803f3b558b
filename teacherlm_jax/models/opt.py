"""OPT decoder-only transformer in Flax (linen), with logical-axis partitioning: the paper's students.

Architecture (Zhang et al., 2022; Hugging Face `OPTForCausalLM`):
  token embeddings [v, p] -> (project_in p -> e when p != e) + learned positions -> N x block -> (final LayerNorm,
  pre-LN only) -> (project_out e -> p) -> LM head tied to the token embeddings.
  block, pre-LN (125M, 1.3B, 2.7B, 6.7B, ...): x + Attention(LN(x)), then x + MLP(LN(x));
  block, post-LN (350M): LN(x + Attention(x)), then LN(x + MLP(x)); 350M also has p = 512 != e = 1024.
  Attention: separate q/k/v/out projections with biases; MLP: fc1 e -> f, ReLU, fc2 f -> e.
  Learned positions: row `pos + 2` of `embed_positions` (OPT's offset of 2), pos counted from each segment's first
  token, as Hugging Face counts from the attention mask, so a left-padded row gets the unpadded logits.

Shapes use (as `models.common`): b = batch, l = length, e = hidden_size, p = word_embed_proj_dim, h = heads,
d = head_dim, f = ffn_dim, v = vocab_size, n = num_layers, P = max_position_embeddings + 2.

Params: `embed_tokens` [v, p], `embed_positions` [P, e], `project_in` [p, e] / `project_out` [e, p] (p != e),
`layers` (scanned, leading [n] axis) or `layers_0` ... with `self_attn/{q,k,v}_proj_kernel` [e, h, d] (+ bias [h, d]),
`self_attn/out_proj_kernel` [h, d, e], `self_attn_layer_norm`, `fc1_kernel` [e, f], `fc2_kernel` [f, e] (+ biases),
`final_layer_norm`; and the decoder's `final_layer_norm` (pre-LN only).

Hugging Face layout (torch Linear weights are [out, in]; the `model.` prefix is optional):
  model.decoder.embed_tokens.weight [v, p] -> embed_tokens; model.decoder.embed_positions.weight [P, e] -> same
  model.decoder.project_in.weight [e, p] -> project_in [p, e]; project_out.weight [p, e] -> project_out [e, p]
  model.decoder.layers.n.self_attn.{q,k,v}_proj.weight [e, e] -> layers/self_attn/{q,k,v}_proj_kernel [e, h, d]
  model.decoder.layers.n.self_attn.out_proj.weight [e, e] -> layers/self_attn/out_proj_kernel [h, d, e]
  model.decoder.layers.n.fc1.weight [f, e] -> layers/fc1_kernel [e, f]; fc2.weight [e, f] -> fc2_kernel [f, e]
  model.decoder.layers.n.{self_attn_layer_norm, final_layer_norm}, model.decoder.final_layer_norm: {weight, bias}
  lm_head.weight -> (tied to embed_tokens; must equal it if present)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from teacherlm_jax.models import common

Array = jax.Array
HF_MODEL_TYPES = ("opt",)
HF_PREFIX = "model."
LAYERS = "layers"
POSITION_OFFSET = 2  # OPT's learned positions start at row 2 (rows 0 and 1 were for padding in fairseq)


@dataclasses.dataclass(frozen=True)
class OptConfig(common.ModelConfig):
  """Hyper-parameters of an OPT model (and `common.ModelConfig`'s dtypes, scan and remat fields).

  Attributes:
    vocab_size, hidden_size (e), num_layers (n), num_heads (h; head_dim = e // h), ffn_dim (f).
    max_position_embeddings: the longest sequence; the position table has 2 more rows (OPT's offset).
    word_embed_proj_dim: width p of the token embeddings; != hidden_size adds project_in / project_out (350M).
      0 = hidden_size.
    do_layer_norm_before: pre-LN blocks (True, most sizes) or post-LN ones without a final LayerNorm (350M).
    layer_norm_epsilon: epsilon of every LayerNorm.
  """

  vocab_size: int = 50272
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  ffn_dim: int = 3072
  max_position_embeddings: int = 2048
  word_embed_proj_dim: int = 0
  do_layer_norm_before: bool = True
  layer_norm_epsilon: float = 1e-5

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    if not self.word_embed_proj_dim:
      object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
    super().__post_init__()

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_kv_heads(self) -> int:
    return self.num_heads

  @property
  def projected(self) -> bool:
    return self.word_embed_proj_dim != self.hidden_size


class Attention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections (all with biases) and an optional KV cache."""

  config: OptConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array, decode: bool) -> Array:
    e, h, d = self.config.hidden_size, self.config.num_heads, self.config.head_dim
    project = lambda name: common.dense(  # noqa: E731
        self, x, name, (e, h, d), ("embed", "heads", "kv"), "ble,ehd->blhd", bias=True)
    q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
    out = common.self_attention(self, q, k, v, positions, segment_ids, decode, common.masking_only)
    return common.dense(self, out, "out_proj", (h, d, e), ("heads", "kv", "embed"), "blhd,hde->ble", bias=True)


class Block(nn.Module):
  """An OPT decoder layer, pre-LN or post-LN. Returns (x, None) so that it can be the body of `nn.scan`."""

  config: OptConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array, decode: bool):
    cfg = self.config
    e, f, pre = cfg.hidden_size, cfg.ffn_dim, cfg.do_layer_norm_before
    attn_norm = common.layer_norm(cfg, "self_attn_layer_norm", cfg.layer_norm_epsilon)
    mlp_norm = common.layer_norm(cfg, "final_layer_norm", cfg.layer_norm_epsilon)
    x = x + Attention(cfg, name="self_attn")(attn_norm(x) if pre else x, positions, segment_ids, decode)
    x = x if pre else attn_norm(x)
    hidden = common.dense(self, mlp_norm(x) if pre else x, "fc1", (e, f), ("embed", "mlp"), "ble,ef->blf", bias=True)
    hidden = nn.with_logical_constraint(jax.nn.relu(hidden), ("batch", "length", "mlp"))
    x = x + common.dense(self, hidden, "fc2", (f, e), ("mlp", "embed"), "blf,fe->ble", bias=True)
    x = x if pre else mlp_norm(x)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class Opt(nn.Module):
  """OPT causal LM: token ids -> logits, with the call signature of `bloom.Bloom` (see there for the arguments)."""

  config: OptConfig

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
               segment_ids: Optional[Array] = None, positions: Optional[Array] = None,
               decode: bool = False, last_only: bool = False, hidden_only: bool = False) -> Array:
    cfg = self.config
    e, p = cfg.hidden_size, cfg.word_embed_proj_dim
    segment_ids, positions = common.sequence_layout(self, input_ids, attention_mask, segment_ids, positions, decode)
    x, embedding = common.embed(self, input_ids, "embed_tokens", cfg.vocab_size, p)
    if cfg.projected:
      x = x @ common.param(self, "project_in", nn.initializers.normal(cfg.initializer_range), (p, e),
                           (None, "embed"), cfg.param_dtype).astype(cfg.dtype)
    table = common.param(self, "embed_positions", nn.initializers.normal(cfg.initializer_range),
                         (cfg.max_position_embeddings + POSITION_OFFSET, e), (None, "embed"), cfg.param_dtype)
    x = x + jnp.take(table, positions + POSITION_OFFSET, axis=0, mode="clip").astype(cfg.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = common.stack_layers(self, Block, cfg, LAYERS, x, positions, segment_ids, decode)
    if last_only:
      x = x[:, -1:]
    if cfg.do_layer_norm_before:
      x = common.layer_norm(cfg, "final_layer_norm", cfg.layer_norm_epsilon)(x)
    if cfg.projected:
      x = x @ common.param(self, "project_out", nn.initializers.normal(cfg.initializer_range), (e, p),
                           ("embed", None), cfg.param_dtype).astype(cfg.dtype)
    if hidden_only:
      return x
    return common.lm_head(cfg, x, embedding.T)


def head_kernel(config: OptConfig, params: dict) -> Array:
  """The LM head's kernel [p, v]: the transposed token embeddings (OPT ties them)."""
  del config
  return jnp.transpose(params["embed_tokens"])


def lookup_params(config: OptConfig) -> int:
  """Params only indexed, never multiplied: the learned position table."""
  return (config.max_position_embeddings + POSITION_OFFSET) * config.hidden_size


# ----------------------------------------------------------------------------------------------- Hugging Face


def config_from_hf(hf_config: dict, **overrides: Any) -> OptConfig:
  """OptConfig with the dimensions of an HF `OPTConfig` dict plus `overrides`."""
  for key, supported in (("activation_function", "relu"), ("enable_bias", True),
                         ("layer_norm_elementwise_affine", True)):
    if hf_config.get(key, supported) != supported:
      raise ValueError(f"{key}={hf_config[key]!r} is not supported (OPT checkpoints use {supported!r})")
  if hf_config.get("_remove_final_layer_norm"):
    raise ValueError("_remove_final_layer_norm=true is not supported")
  get = functools.partial(common.hf_field, hf_config)
  hidden = int(get("hidden_size"))
  return OptConfig(
      vocab_size=int(get("vocab_size")), hidden_size=hidden, num_layers=int(get("num_hidden_layers")),
      num_heads=int(get("num_attention_heads")), ffn_dim=int(get("ffn_dim")),
      max_position_embeddings=int(get("max_position_embeddings")),
      word_embed_proj_dim=int(hf_config.get("word_embed_proj_dim") or hidden),
      do_layer_norm_before=bool(hf_config.get("do_layer_norm_before", True)),
      layer_norm_epsilon=float(hf_config.get("layer_norm_eps", 1e-5)),
      initializer_range=float(hf_config.get("init_std", hf_config.get("initializer_range", 0.02))), **overrides)


def hf_config(config: OptConfig, dtype: str, base: Optional[dict] = None) -> dict:
  """An HF `config.json` dict for `config`, keeping the other fields (token ids, ...) of `base` when given."""
  result = dict(base or {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "dropout": 0.0,
                         "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0, "use_cache": True})
  for old_key in ("torch_dtype", "transformers_version"):
    result.pop(old_key, None)
  result.update(
      architectures=["OPTForCausalLM"], model_type="opt", vocab_size=config.vocab_size,
      hidden_size=config.hidden_size, num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      ffn_dim=config.ffn_dim, max_position_embeddings=config.max_position_embeddings,
      word_embed_proj_dim=config.word_embed_proj_dim, do_layer_norm_before=config.do_layer_norm_before,
      activation_function="relu", enable_bias=True, layer_norm_elementwise_affine=True,
      init_std=config.initializer_range, tie_word_embeddings=True, dtype=dtype)
  return result


def tensor_mappings(config: OptConfig) -> dict[str, common.TensorMapping]:
  """Every HF tensor name of an OPT model (with the `model.` prefix) -> its mapping."""
  e, h, d, f, v, p = (config.hidden_size, config.num_heads, config.head_dim, config.ffn_dim, config.vocab_size,
                      config.word_embed_proj_dim)
  same, t, leaf = common.identity, common.transpose, common.TensorMapping
  top = "model.decoder"
  mappings = {f"{top}.embed_tokens.weight": leaf(("embed_tokens",), None, (v, p), same, same),
              f"{top}.embed_positions.weight": leaf(("embed_positions",), None,
                                                    (config.max_position_embeddings + POSITION_OFFSET, e), same, same)}
  if config.projected:
    mappings[f"{top}.project_in.weight"] = leaf(("project_in",), None, (e, p), t, t)
    mappings[f"{top}.project_out.weight"] = leaf(("project_out",), None, (p, e), t, t)
  if config.do_layer_norm_before:
    mappings[f"{top}.final_layer_norm.weight"] = leaf(("final_layer_norm", "scale"), None, (e,), same, same)
    mappings[f"{top}.final_layer_norm.bias"] = leaf(("final_layer_norm", "bias"), None, (e,), same, same)
  per_layer = {}
  for name in ("q_proj", "k_proj", "v_proj"):
    per_layer[f"self_attn.{name}.weight"] = (("self_attn", f"{name}_kernel"), (e, e), lambda x: x.T.reshape(e, h, d),
                                             lambda x: x.reshape(e, e).T)
    per_layer[f"self_attn.{name}.bias"] = (("self_attn", f"{name}_bias"), (e,), lambda x: x.reshape(h, d),
                                           lambda x: x.reshape(e))
  per_layer["self_attn.out_proj.weight"] = (("self_attn", "out_proj_kernel"), (e, e), lambda x: x.T.reshape(h, d, e),
                                            lambda x: x.reshape(e, e).T)
  per_layer["self_attn.out_proj.bias"] = (("self_attn", "out_proj_bias"), (e,), same, same)
  for name in ("self_attn_layer_norm", "final_layer_norm"):
    per_layer[f"{name}.weight"] = ((name, "scale"), (e,), same, same)
    per_layer[f"{name}.bias"] = ((name, "bias"), (e,), same, same)
  per_layer.update({"fc1.weight": (("fc1_kernel",), (f, e), t, t), "fc1.bias": (("fc1_bias",), (f,), same, same),
                    "fc2.weight": (("fc2_kernel",), (e, f), t, t), "fc2.bias": (("fc2_bias",), (e,), same, same)})
  mappings.update(common.layer_mappings(config, LAYERS, f"{top}.layers", per_layer))
  return mappings


def tied_head(config: OptConfig) -> Optional[tuple[str, tuple[str, ...]]]:
  """(HF name of the LM head, params path of the embeddings it equals): OPT always ties them."""
  del config
  return "lm_head.weight", ("embed_tokens",)
