"""The one model interface: every family by name, by Hugging Face `model_type` and by config class.

  family           modules              Hugging Face model_type   config (gin)           BOS (tokenizer files)
  bloom            models/bloom.py      bloom                     bloom.BloomConfig      no
  opt              models/opt.py        opt                       opt.OptConfig          yes (</s>)
  llama            models/llama.py      llama, mistral, qwen2     llama.LlamaConfig      llama/mistral yes, qwen2 no

Everything outside `models/` builds, converts, decodes, scores and trains through these functions, so a new family
is a module with the same names (Config, Model, HF_MODEL_TYPES, HF_PREFIX, LAYERS, head_kernel, lookup_params,
config_from_hf, hf_config, tensor_mappings, tied_head) and a line in `FAMILIES`:

  build(config)                     the Flax module of a config (any family)
  family(config) / family_named(n) / family_for_hf(hf_config)
  config_to_dict / config_from_dict  {"family": name, ...fields}: what checkpoints store (no family = bloom)
  head_kernel(config, params)       the LM head's [e, v] kernel (tied or not), for callers applying it themselves
  relayout_layers(config, params, scan_layers=...)   scanned <-> per-layer params
  shape_fields(config)              the fields that make two checkpoints the same model
  flops_per_token(config, length)   training FLOPs per token (MFU)
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import jax

from teacherlm_jax.models import bloom, common, llama, opt


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: its module (the functions above), config class and Flax module class."""

  name: str
  module: types.ModuleType
  config_class: type
  model_class: type


FAMILIES = {
    "bloom": Family("bloom", bloom, bloom.BloomConfig, bloom.Bloom),
    "opt": Family("opt", opt, opt.OptConfig, opt.Opt),
    "llama": Family("llama", llama, llama.LlamaConfig, llama.Llama),
}


def family_named(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"model family {name!r} is unknown; known: {sorted(FAMILIES)}")
  return FAMILIES[name]


def family(config: Any) -> Family:
  """The family of a config object."""
  for candidate in FAMILIES.values():
    if isinstance(config, candidate.config_class):
      return candidate
  raise TypeError(f"{type(config).__name__} is not a model config; expected one of "
                  f"{[f.config_class.__name__ for f in FAMILIES.values()]}")


def family_for_hf(hf_config: dict) -> Family:
  """The family that reads a Hugging Face config (by `model_type`, else by `architectures`)."""
  model_type = hf_config.get("model_type")
  for candidate in FAMILIES.values():
    if model_type in candidate.module.HF_MODEL_TYPES:
      return candidate
  architectures = hf_config.get("architectures") or []
  for candidate in FAMILIES.values():
    if any(a.lower().startswith(candidate.module.HF_MODEL_TYPES) for a in architectures):
      return candidate
  supported = sorted(t for f in FAMILIES.values() for t in f.module.HF_MODEL_TYPES)
  raise ValueError(f"model_type={model_type!r}, architectures={architectures}: not a supported family (model_type "
                   f"one of {supported})")


def build(config: Any):
  """The Flax module for `config`."""
  return family(config).model_class(config)


def config_to_dict(config: Any) -> dict[str, Any]:
  return {"family": family(config).name, **config.to_dict()}


def config_from_dict(values: dict[str, Any]) -> Any:
  """A config from `config_to_dict`'s output; a dict without "family" is a BLOOM config (older checkpoints)."""
  values = dict(values)
  return family_named(values.pop("family", "bloom")).config_class.from_dict(values)


def shape_fields(config: Any) -> dict[str, Any]:
  """The fields that define the model's params and outputs (all but how it runs: dtypes, scan, remat, and how
  fresh params would be drawn)."""
  values = config_to_dict(config)
  return {key: value for key, value in values.items()
          if key not in common.RUNTIME_FIELDS and key != "initializer_range"}


def head_kernel(config: Any, params: dict) -> jax.Array:
  return family(config).module.head_kernel(config, params)


def relayout_layers(config: Any, params: dict, *, scan_layers: bool) -> dict:
  return common.relayout_layers(params, config.num_layers, scan_layers=scan_layers,
                                name=family(config).module.LAYERS)


@functools.lru_cache(maxsize=64)
def num_params(config: Any) -> int:
  """Parameters of the model `config` describes (shapes only: nothing is computed)."""
  model = build(config)
  return common.count_params(jax.eval_shape(lambda key: common.init_params(model, key, length=2),
                                            jax.random.key(0)))


def flops_per_token(config: Any, sequence_length: int) -> float:
  """Training FLOPs per token of `config`'s family (6 x matmul params + attention, see `common`)."""
  return common.training_flops_per_token(config, num_params(config), family(config).module.lookup_params(config),
                                         sequence_length)

