"""Hugging Face BLOOM checkpoints <-> teacherlm-jax params.

Command line:
  python -m teacherlm_jax.convert import-hf --hf_dir DIR --out CKPT [--mesh_fsdp N ...] [--no_scan_layers]
  python -m teacherlm_jax.convert export-hf --ckpt CKPT --out DIR [--dtype bfloat16] [--max_shard_size 5GB]

Python:
  model, params = load_hf_bloom("path/to/bloom-560m")
  logits = model.apply({"params": params}, input_ids)           # [batch, length, vocab], float32

Only safetensors are read (`model.safetensors`, or shards listed by `model.safetensors.index.json`); PyTorch
pickles (`*.bin`) are refused. Import streams one tensor at a time into the output arrays, so peak host memory is the
output plus one tensor. Every error names the file and the tensor.

Name and layout mapping (HF tensors are torch Linear weights [out, in]; n = layer):
  [transformer.]word_embeddings.weight [v, e]            -> word_embeddings [v, e]
  [transformer.]word_embeddings_layernorm.{weight,bias}  -> word_embeddings_layernorm/{scale,bias}
  [transformer.]h.n.input_layernorm / post_attention_layernorm / ln_f  -> same names, {scale,bias}
  [transformer.]h.n.self_attention.query_key_value.weight [3e, e] -> self_attention/qkv_kernel [e, h, 3, d]
  [transformer.]h.n.self_attention.dense.weight [e, e]   -> self_attention/dense_kernel [h, d, e]
  [transformer.]h.n.mlp.dense_h_to_4h.weight [4e, e]     -> mlp/wi_kernel [e, 4e]
  [transformer.]h.n.mlp.dense_4h_to_h.weight [e, 4e]     -> mlp/wo_kernel [4e, e]
  lm_head.weight                                         -> (tied to word_embeddings; must equal it if present)
Layer params live under `h` with a leading [n] axis when the model scans its layers, else under `h_0`...`h_{n-1}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath
from tqdm import tqdm

from teacherlm_jax import checkpoints, partitioning
from teacherlm_jax.models import bloom

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class ConversionError(ValueError):
  """A Hugging Face directory or checkpoint that cannot be converted; the message names the file and tensor."""


@dataclasses.dataclass(frozen=True)
class TensorMapping:
  """How one HF tensor maps onto one params leaf: path in the params tree, layer (or None), and the reshapes."""

  path: tuple[str, ...]
  layer: Optional[int]
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------------- config


def read_hf_config(hf_dir: str) -> dict:
  """Reads and validates `config.json` of a Hugging Face BLOOM directory."""
  path = epath.Path(hf_dir) / CONFIG_FILE
  if not path.exists():
    raise ConversionError(f"{path}: missing (a Hugging Face model directory needs its config.json)")
  try:
    hf_config = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ConversionError(f"{path}: invalid JSON ({error})") from error
  architectures = hf_config.get("architectures") or []
  if hf_config.get("model_type") != "bloom" and not any(a.startswith("Bloom") for a in architectures):
    raise ConversionError(f"{path}: model_type={hf_config.get('model_type')!r}, architectures={architectures}; "
                          "only BLOOM checkpoints (model_type 'bloom') can be converted")
  if hf_config.get("apply_residual_connection_post_layernorm"):
    raise ConversionError(f"{path}: apply_residual_connection_post_layernorm=true is not supported")
  return hf_config


def bloom_config_from_hf(hf_config: dict, **overrides: Any) -> bloom.BloomConfig:
  """BloomConfig with the dimensions of an HF config (accepting BLOOM's older key names) plus `overrides`."""
  def first(*keys: str):
    for key in keys:
      if hf_config.get(key) is not None:
        return hf_config[key]
    raise ConversionError(f"{CONFIG_FILE}: none of the fields {keys} is set")
  try:
    return bloom.BloomConfig(
        vocab_size=int(first("vocab_size")), hidden_size=int(first("n_embed", "hidden_size")),
        num_layers=int(first("n_layer", "num_hidden_layers")), num_heads=int(first("n_head", "num_attention_heads")),
        layer_norm_epsilon=float(hf_config.get("layer_norm_epsilon", 1e-5)),
        initializer_range=float(hf_config.get("initializer_range", 0.02)), **overrides)
  except ConversionError:
    raise
  except (TypeError, ValueError) as error:  # a non-numeric field, or a hidden_size the heads do not divide
    raise ConversionError(f"{CONFIG_FILE}: {error}") from error


def hf_config_from_bloom(config: bloom.BloomConfig, dtype: str, base: Optional[dict] = None) -> dict:
  """An HF `config.json` dict for `config`, keeping the other fields (token ids, ...) of `base` when given."""
  hf_config = dict(base or {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "unk_token_id": 0,
                            "hidden_dropout": 0.0, "attention_dropout": 0.0, "use_cache": True,
                            "pretraining_tp": 1, "slow_but_exact": False})
  for old_key in ("n_embed", "num_attention_heads", "num_hidden_layers", "torch_dtype", "transformers_version"):
    hf_config.pop(old_key, None)
  hf_config.update(
      architectures=["BloomForCausalLM"], model_type="bloom", vocab_size=config.vocab_size,
      hidden_size=config.hidden_size, n_layer=config.num_layers, n_head=config.num_heads,
      layer_norm_epsilon=config.layer_norm_epsilon, initializer_range=config.initializer_range,
      apply_residual_connection_post_layernorm=False, tie_word_embeddings=True, dtype=dtype)
  return hf_config


# ----------------------------------------------------------------------------------------------- names


def tensor_mappings(config: bloom.BloomConfig) -> dict[str, TensorMapping]:
  """Every HF tensor name (without the `transformer.` prefix) of a BLOOM model -> its mapping."""
  e, h, d = config.hidden_size, config.num_heads, config.head_dim
  same = TensorMapping((), None, lambda x: x, lambda x: x)
  mappings = {"word_embeddings.weight": dataclasses.replace(same, path=("word_embeddings",))}
  for hf_name, flax_name in (("word_embeddings_layernorm", "word_embeddings_layernorm"), ("ln_f", "ln_f")):
    mappings[f"{hf_name}.weight"] = dataclasses.replace(same, path=(flax_name, "scale"))
    mappings[f"{hf_name}.bias"] = dataclasses.replace(same, path=(flax_name, "bias"))
  per_layer = {
      "input_layernorm.weight": (("input_layernorm", "scale"), lambda x: x, lambda x: x),
      "input_layernorm.bias": (("input_layernorm", "bias"), lambda x: x, lambda x: x),
      "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), lambda x: x, lambda x: x),
      "post_attention_layernorm.bias": (("post_attention_layernorm", "bias"), lambda x: x, lambda x: x),
      "self_attention.query_key_value.weight": (
          ("self_attention", "qkv_kernel"), lambda x: x.T.reshape(e, h, 3, d), lambda x: x.reshape(e, 3 * e).T),
      "self_attention.query_key_value.bias": (
          ("self_attention", "qkv_bias"), lambda x: x.reshape(h, 3, d), lambda x: x.reshape(3 * e)),
      "self_attention.dense.weight": (
          ("self_attention", "dense_kernel"), lambda x: x.T.reshape(h, d, e), lambda x: x.reshape(e, e).T),
      "self_attention.dense.bias": (("self_attention", "dense_bias"), lambda x: x, lambda x: x),
      "mlp.dense_h_to_4h.weight": (("mlp", "wi_kernel"), lambda x: x.T, lambda x: x.T),
      "mlp.dense_h_to_4h.bias": (("mlp", "wi_bias"), lambda x: x, lambda x: x),
      "mlp.dense_4h_to_h.weight": (("mlp", "wo_kernel"), lambda x: x.T, lambda x: x.T),
      "mlp.dense_4h_to_h.bias": (("mlp", "wo_bias"), lambda x: x, lambda x: x),
  }
  for n in range(config.num_layers):
    for suffix, (path, to_flax, to_hf) in per_layer.items():
      prefix = ("h",) if config.scan_layers else (f"h_{n}",)
      layer = n if config.scan_layers else None
      mappings[f"h.{n}.{suffix}"] = TensorMapping(prefix + path, layer, to_flax, to_hf)
  return mappings


def hf_shapes(config: bloom.BloomConfig) -> dict[str, tuple[int, ...]]:
  """Expected HF tensor shapes by name (without prefix)."""
  e, v, m = config.hidden_size, config.vocab_size, config.mlp_dim
  shapes = {"word_embeddings.weight": (v, e)}
  for name in ("word_embeddings_layernorm", "ln_f"):
    shapes.update({f"{name}.weight": (e,), f"{name}.bias": (e,)})
  per_layer = {"input_layernorm.weight": (e,), "input_layernorm.bias": (e,),
               "post_attention_layernorm.weight": (e,), "post_attention_layernorm.bias": (e,),
               "self_attention.query_key_value.weight": (3 * e, e), "self_attention.query_key_value.bias": (3 * e,),
               "self_attention.dense.weight": (e, e), "self_attention.dense.bias": (e,),
               "mlp.dense_h_to_4h.weight": (m, e), "mlp.dense_h_to_4h.bias": (m,),
               "mlp.dense_4h_to_h.weight": (e, m), "mlp.dense_4h_to_h.bias": (e,)}
  for n in range(config.num_layers):
    shapes.update({f"h.{n}.{suffix}": shape for suffix, shape in per_layer.items()})
  return shapes


def _strip_prefix(name: str) -> str:
  return name[len("transformer."):] if name.startswith("transformer.") else name


# ----------------------------------------------------------------------------------------------- reading


def safetensors_files(hf_dir: str) -> dict[str, list[str]]:
  """{file path: tensor names it holds}, from the index file (sharded) or the single `model.safetensors`."""
  directory = epath.Path(hf_dir)
  index_path, single_path = directory / INDEX_FILE, directory / SINGLE_FILE
  if index_path.exists():
    try:
      weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as error:
      raise ConversionError(f"{index_path}: not a safetensors index ({error!r})") from error
    files: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
      files.setdefault(str(directory / file_name), []).append(name)
    return files
  if single_path.exists():
    return {str(single_path): []}  # names come from the file itself
  pickles = sorted(p.name for p in directory.glob("*.bin")) if directory.exists() else []
  hint = f" (found {pickles}: PyTorch pickles are never loaded; convert them to safetensors first)" if pickles else ""
  raise ConversionError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}")


def iter_hf_tensors(hf_dir: str) -> Iterator[tuple[str, str, np.ndarray]]:
  """Yields (file, name, array) for every tensor, one at a time (arrays are read lazily from each file)."""
  for file_name, indexed in tqdm(safetensors_files(hf_dir).items(), desc="safetensors files", unit="file"):
    if not epath.Path(file_name).exists():
      raise ConversionError(f"{file_name}: missing, but {INDEX_FILE} lists tensors {indexed[:5]} in it")
    try:
      handle = safetensors.safe_open(file_name, framework="numpy")
    except Exception as error:  # safetensors raises its own error types for bad headers
      raise ConversionError(f"{file_name}: not a readable safetensors file ({error})") from error
    with handle:
      names = list(handle.keys())
      missing = sorted(set(indexed) - set(names))
      if missing:
        raise ConversionError(f"{file_name}: tensors {missing[:5]} are listed in {INDEX_FILE} but not in the file")
      for name in names:
        try:
          array = handle.get_tensor(name)
        except Exception as error:
          raise ConversionError(f"{file_name}: tensor {name!r} cannot be read ({error})") from error
        yield file_name, name, array


def import_hf_params(hf_dir: str, config: bloom.BloomConfig, *, mesh: Optional[jax.sharding.Mesh] = None,
                     rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES) -> dict:
  """Reads an HF BLOOM directory into a params tree for `config` (host numpy arrays, or sharded on `mesh`)."""
  mappings, shapes = tensor_mappings(config), hf_shapes(config)
  boxed = jax.eval_shape(lambda key: bloom.init_params(bloom.Bloom(config), key), jax.random.key(0))
  buffers = jax.tree.map(lambda s: np.empty(s.shape, np.dtype(config.param_dtype)), nn.unbox(boxed))
  seen: dict[str, str] = {}
  lm_head: Optional[tuple[str, np.ndarray]] = None
  for file_name, name, array in iter_hf_tensors(hf_dir):
    key = _strip_prefix(name)
    if key == "lm_head.weight":
      lm_head = (file_name, array)
      continue
    if key not in mappings:
      raise ConversionError(f"{file_name}: unexpected tensor {name!r} (not a BLOOM parameter of a "
                            f"{config.num_layers}-layer model)")
    if tuple(array.shape) != shapes[key]:
      raise ConversionError(f"{file_name}: tensor {name!r} has shape {tuple(array.shape)}, expected {shapes[key]} "
                            f"from {CONFIG_FILE}")
    if key in seen:
      raise ConversionError(f"{file_name}: tensor {name!r} appears twice (also in {seen[key]})")
    seen[key] = file_name
    _write(buffers, mappings[key], array)
  missing = sorted(set(mappings) - set(seen), key=_natural_key)
  if missing:
    raise ConversionError(f"{hf_dir}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                          f"({len(missing)} of {len(mappings)})")
  if lm_head is not None:
    _check_tied(lm_head, buffers["word_embeddings"])
  if mesh is None:
    return buffers
  return partitioning.shard_host_arrays(buffers, partitioning.logical_shardings(boxed, mesh, rules))


def _write(buffers: dict, mapping: TensorMapping, array: np.ndarray) -> None:
  target = buffers
  for key in mapping.path[:-1]:
    target = target[key]
  value = mapping.to_flax(array).astype(target[mapping.path[-1]].dtype)
  if mapping.layer is None:
    target[mapping.path[-1]][...] = value
  else:
    target[mapping.path[-1]][mapping.layer] = value


def _check_tied(lm_head: tuple[str, np.ndarray], embeddings: np.ndarray) -> None:
  file_name, array = lm_head
  if array.shape != embeddings.shape or not np.array_equal(array.astype(embeddings.dtype), embeddings):
    raise ConversionError(f"{file_name}: tensor 'lm_head.weight' differs from the word embeddings; BLOOM ties them "
                          "and untied heads are not supported")


def _natural_key(name: str) -> list:
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def load_hf_bloom(hf_dir: str, *, mesh: Optional[jax.sharding.Mesh] = None,
                  rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES,
                  **config_overrides: Any) -> tuple[bloom.Bloom, dict]:
  """(model, params) from a Hugging Face BLOOM directory; `model.apply({"params": params}, ids)` gives logits.

  `config_overrides` set the BloomConfig fields that are not in the HF config (dtype, param_dtype, scan_layers,
  scan_unroll, remat_policy, logits_dtype); the defaults are float32 with scanned layers.
  """
  config = bloom_config_from_hf(read_hf_config(hf_dir), **config_overrides)
  params = import_hf_params(hf_dir, config, mesh=mesh, rules=rules)
  if mesh is None:
    params = jax.tree.map(jax.numpy.asarray, params)
  return bloom.Bloom(config), params


def load_model(path: str, *, mesh: Optional[jax.sharding.Mesh] = None,
               rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES,
               dtype: str = "float32", scan_layers: Optional[bool] = None) -> tuple[bloom.Bloom, dict]:
  """(model, params, on the mesh when given) from a params checkpoint, a training run's MODEL_DIR (its final_params)
  or a Hugging Face BLOOM directory; `dtype` is the activation dtype; `scan_layers` the params layout (None: the
  checkpoint's; a Hugging Face directory loads scanned), e.g. False for decoding (`decoding.per_layer`)."""
  layout = {} if scan_layers is None else {"scan_layers": scan_layers}
  resolved = checkpoints.resolve(path)
  if (epath.Path(resolved) / checkpoints.METADATA_FILE).exists():
    config = dataclasses.replace(checkpoints.load_config(resolved), dtype=dtype, **layout)
    return bloom.Bloom(config), checkpoints.load_params(resolved, config, mesh=mesh, rules=rules)
  if (epath.Path(path) / CONFIG_FILE).exists():
    return load_hf_bloom(path, mesh=mesh, rules=rules, dtype=dtype, **layout)
  raise FileNotFoundError(f"{path}: neither a params checkpoint ({checkpoints.METADATA_FILE}), a training run with "
                          f"final_params, nor a Hugging Face directory ({CONFIG_FILE})")


# ----------------------------------------------------------------------------------------------- writing


def parse_size(size: str) -> int:
  """'5GB' / '200MB' / '100KB' / '12345' -> bytes (decimal units, as Hugging Face uses)."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", size.upper())
  if not match:
    raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 200MB, 100KB")
  scale = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[match.group(2)]
  return int(float(match.group(1)) * scale)


def hf_tensors(params: dict, config: bloom.BloomConfig, dtype: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields ("transformer.<name>", array in `dtype`) for every tensor, in HF order, from a params tree."""
  params = bloom.relayout_layers(params, config.num_layers, scan_layers=config.scan_layers)
  for key, mapping in tensor_mappings(config).items():
    leaf = params
    for part in mapping.path:
      leaf = leaf[part]
    array = np.asarray(jax.device_get(leaf if mapping.layer is None else leaf[mapping.layer]))
    yield f"transformer.{key}", np.ascontiguousarray(mapping.to_hf(array).astype(DTYPES[dtype]))


def write_hf_dir(params: dict, config: bloom.BloomConfig, out_dir: str, *, dtype: str = "float32",
                 max_shard_size: str = "5GB", hf_config_base: Optional[dict] = None) -> list[str]:
  """Writes `config.json` and safetensors (sharded with an index above `max_shard_size`); returns the files."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
  directory = epath.Path(out_dir)
  directory.mkdir(parents=True, exist_ok=True)
  shards = _group_shards(hf_tensors(params, config, dtype), parse_size(max_shard_size))
  written, weight_map, total = [], {}, 0
  for number, shard in enumerate(tqdm(shards, desc="writing safetensors", unit="shard"), start=1):
    file_name = SINGLE_FILE if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, str(directory / file_name), metadata={"format": "pt"})
    weight_map.update({name: file_name for name in shard})
    total += sum(array.nbytes for array in shard.values())
    written.append(file_name)
  if len(shards) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    written.append(INDEX_FILE)
  hf_config = hf_config_from_bloom(config, dtype, hf_config_base)
  (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True))
  return written + [CONFIG_FILE]


def _group_shards(tensors: Iterator[tuple[str, np.ndarray]], max_bytes: int) -> list[dict[str, np.ndarray]]:
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in tensors:
    if shards[-1] and size + array.nbytes > max_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  return shards


# ----------------------------------------------------------------------------------------------- commands


def import_hf(hf_dir: str, out: str, *, scan_layers: bool = True, mesh: Optional[jax.sharding.Mesh] = None) -> None:
  """`import-hf`: HF directory -> params checkpoint (orbax params + config + tokenizer files)."""
  hf_config = read_hf_config(hf_dir)
  config = bloom_config_from_hf(hf_config, scan_layers=scan_layers)
  params = import_hf_params(hf_dir, config, mesh=mesh)
  checkpoints.save_params(out, params, config, hf_config=hf_config, source=f"import-hf {hf_dir}")
  checkpoints.copy_tokenizer_files(hf_dir, out)


def export_hf(ckpt: str, out: str, *, dtype: Optional[str] = None, max_shard_size: str = "5GB") -> list[str]:
  """`export-hf`: params checkpoint -> HF directory (in the imported model's dtype unless `dtype` is given)."""
  metadata = checkpoints.read_metadata(ckpt)
  config = checkpoints.load_config(ckpt)
  hf_config = metadata.get("hf_config")
  dtype = dtype or _hf_dtype(hf_config) or "float32"
  params = checkpoints.load_params(ckpt, config)
  written = write_hf_dir(params, config, out, dtype=dtype, max_shard_size=max_shard_size,
                         hf_config_base=hf_config)
  return written + checkpoints.copy_tokenizer_files(ckpt, out)


def _hf_dtype(hf_config: Optional[dict]) -> Optional[str]:
  dtype = (hf_config or {}).get("dtype") or (hf_config or {}).get("torch_dtype")
  return dtype if dtype in DTYPES else None


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m teacherlm_jax.convert", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  to_jax = commands.add_parser("import-hf", help="Hugging Face BLOOM directory -> params checkpoint")
  to_jax.add_argument("--hf_dir", required=True)
  to_jax.add_argument("--out", required=True)
  to_jax.add_argument("--no_scan_layers", action="store_true", help="store layers as h_0..h_{n-1}")
  for axis in partitioning.MESH_AXES:
    to_jax.add_argument(f"--mesh_{axis}", type=int, default=None,
                        help="lay the params out sharded on a (data, fsdp, tensor) mesh; -1 = the rest")
  to_hf = commands.add_parser("export-hf", help="params checkpoint -> Hugging Face BLOOM directory")
  to_hf.add_argument("--ckpt", required=True)
  to_hf.add_argument("--out", required=True)
  to_hf.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="tensor dtype (default: the dtype of the imported checkpoint, else float32)")
  to_hf.add_argument("--max_shard_size", default="5GB")
  args = parser.parse_args(argv)
  try:
    if args.command == "import-hf":
      import_hf(args.hf_dir, args.out, scan_layers=not args.no_scan_layers, mesh=_mesh_from_args(args))
      print(f"wrote params checkpoint {args.out}")
    else:
      written = export_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
      print(f"wrote {args.out}: {', '.join(written)}")
  except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


def _mesh_from_args(args: argparse.Namespace) -> Optional[jax.sharding.Mesh]:
  sizes = {axis: getattr(args, f"mesh_{axis}") for axis in partitioning.MESH_AXES}
  if all(size is None for size in sizes.values()):
    return None
  return partitioning.make_mesh(**{axis: 1 if size is None else size for axis, size in sizes.items()})


if __name__ == "__main__":
  sys.exit(main())
