"""Hugging Face checkpoints (BLOOM, OPT, Llama / Qwen2 / Mistral) <-> teacherlm-jax params.

Command line:
  python -m teacherlm_jax.convert import-hf --hf_dir DIR --out CKPT [--mesh_fsdp N ...] [--no_scan_layers]
  python -m teacherlm_jax.convert export-hf --ckpt CKPT --out DIR [--dtype bfloat16] [--max_shard_size 5GB]

Python:
  model, params = load_hf("path/to/opt-1.3b")                  # any registered family (models.registry)
  logits = model.apply({"params": params}, input_ids)           # [batch, length, vocab], float32

The family comes from `config.json`'s `model_type` (`models.registry.family_for_hf`); each family's module in
`teacherlm_jax/models/` documents its tensor names and layouts (`tensor_mappings`), which this module applies. Only
safetensors are read (`model.safetensors`, or shards listed by `model.safetensors.index.json`); PyTorch pickles
(`*.bin`) are refused. Import streams one tensor at a time into the output arrays, so peak host memory is the output
plus one tensor. Every error names the file and the tensor. Tensor names are accepted with or without the family's
prefix (`transformer.` for BLOOM, `model.` for OPT and the Llama family); exports write the prefixed names
`transformers` writes. A tied LM head (`lm_head.weight`) may be present, and must then equal the embeddings.
Layer params live under one name with a leading [n] axis when the model scans its layers, else under `<name>_0`...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from typing import Any, Iterator, Optional

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath
from tqdm import tqdm

from teacherlm_jax import checkpoints, partitioning
from teacherlm_jax.models import common, registry

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class ConversionError(ValueError):
  """A Hugging Face directory or checkpoint that cannot be converted; the message names the file and tensor."""


# ----------------------------------------------------------------------------------------------- config


def read_hf_config(hf_dir: str) -> dict:
  """Reads and validates `config.json` of a Hugging Face model directory (of a registered family)."""
  path = epath.Path(hf_dir) / CONFIG_FILE
  if not path.exists():
    raise ConversionError(f"{path}: missing (a Hugging Face model directory needs its config.json)")
  try:
    hf_config = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ConversionError(f"{path}: invalid JSON ({error})") from error
  try:
    registry.family_for_hf(hf_config)
  except ValueError as error:
    raise ConversionError(f"{path}: {error}") from error
  return hf_config


def config_from_hf(hf_config: dict, **overrides: Any) -> Any:
  """The model config (of the family `model_type` names) with the dimensions of an HF config plus `overrides`
  (fields that are not in the HF config: dtype, param_dtype, scan_layers, scan_unroll, remat_policy, ...)."""
  try:
    return registry.family_for_hf(hf_config).module.config_from_hf(hf_config, **overrides)
  except (TypeError, ValueError) as error:  # a missing or non-numeric field, heads that do not divide, ...
    raise ConversionError(f"{CONFIG_FILE}: {error}") from error


def hf_config_for(config: Any, dtype: str, base: Optional[dict] = None) -> dict:
  """An HF `config.json` dict for `config`, keeping the other fields (token ids, ...) of `base` when given."""
  return registry.family(config).module.hf_config(config, dtype, base)


# ----------------------------------------------------------------------------------------------- names


def tensor_mappings(config: Any) -> dict[str, common.TensorMapping]:
  """Every HF tensor name (prefixed as `transformers` writes it) of the model -> its mapping."""
  return registry.family(config).module.tensor_mappings(config)


def _canonical(name: str, mappings: dict[str, common.TensorMapping], prefix: str) -> str:
  """The mapping key of a tensor name, which may lack the family's prefix (older Hub checkpoints)."""
  return name if name in mappings or prefix + name not in mappings else prefix + name


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


def import_hf_params(hf_dir: str, config: Any, *, mesh: Optional[jax.sharding.Mesh] = None,
                     rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES) -> dict:
  """Reads an HF directory into a params tree for `config` (host numpy arrays, or sharded on `mesh`)."""
  module = registry.family(config).module
  mappings, tied = tensor_mappings(config), module.tied_head(config)
  boxed = jax.eval_shape(lambda key: common.init_params(registry.build(config), key), jax.random.key(0))
  buffers = jax.tree.map(lambda s: np.empty(s.shape, np.dtype(config.param_dtype)), nn.unbox(boxed))
  seen: dict[str, str] = {}
  lm_head: Optional[tuple[str, np.ndarray]] = None
  for file_name, name, array in iter_hf_tensors(hf_dir):
    key = _canonical(name, mappings, module.HF_PREFIX)
    if tied is not None and key in (tied[0], module.HF_PREFIX + tied[0]):
      lm_head = (file_name, array)
      continue
    if key not in mappings:
      raise ConversionError(f"{file_name}: unexpected tensor {name!r} (not a parameter of this "
                            f"{config.num_layers}-layer {registry.family(config).name} model)")
    if tuple(array.shape) != mappings[key].shape:
      raise ConversionError(f"{file_name}: tensor {name!r} has shape {tuple(array.shape)}, expected "
                            f"{mappings[key].shape} from {CONFIG_FILE}")
    if key in seen:
      raise ConversionError(f"{file_name}: tensor {name!r} appears twice (also in {seen[key]})")
    seen[key] = file_name
    _write(buffers, mappings[key], array)
  missing = sorted(set(mappings) - set(seen), key=_natural_key)
  if missing:
    raise ConversionError(f"{hf_dir}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                          f"({len(missing)} of {len(mappings)})")
  if lm_head is not None:
    _check_tied(lm_head, _leaf(buffers, tied[1]))
  if mesh is None:
    return buffers
  return partitioning.shard_host_arrays(buffers, partitioning.logical_shardings(boxed, mesh, rules))


def _leaf(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _write(buffers: dict, mapping: common.TensorMapping, array: np.ndarray) -> None:
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
    raise ConversionError(f"{file_name}: tensor 'lm_head.weight' differs from the embeddings, but the model ties "
                          "them (tie_word_embeddings); untie them in config.json where the family allows it")


def _natural_key(name: str) -> list:
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def load_hf(hf_dir: str, *, mesh: Optional[jax.sharding.Mesh] = None,
            rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES,
            **config_overrides: Any) -> tuple[Any, dict]:
  """(model, params) from a Hugging Face directory of any registered family; `model.apply({"params": params}, ids)`
  gives logits.

  `config_overrides` set the config fields that are not in the HF config (dtype, param_dtype, scan_layers,
  scan_unroll, remat_policy, logits_dtype); the defaults are float32 with scanned layers.
  """
  config = config_from_hf(read_hf_config(hf_dir), **config_overrides)
  params = import_hf_params(hf_dir, config, mesh=mesh, rules=rules)
  if mesh is None:
    params = jax.tree.map(jax.numpy.asarray, params)
  return registry.build(config), params



def load_model(path: str, *, mesh: Optional[jax.sharding.Mesh] = None,
               rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES,
               dtype: str = "float32", scan_layers: Optional[bool] = None) -> tuple[Any, dict]:
  """(model, params, on the mesh when given) from a params checkpoint, a training run's MODEL_DIR (its final_params)
  or a Hugging Face directory of any family; `dtype` is the activation dtype; `scan_layers` the params layout (None:
  the checkpoint's; a Hugging Face directory loads scanned), e.g. False for decoding (`decoding.per_layer`)."""
  layout = {} if scan_layers is None else {"scan_layers": scan_layers}
  resolved = checkpoints.resolve(path)
  if (epath.Path(resolved) / checkpoints.METADATA_FILE).exists():
    config = dataclasses.replace(checkpoints.load_config(resolved), dtype=dtype, **layout)
    return registry.build(config), checkpoints.load_params(resolved, config, mesh=mesh, rules=rules)
  if (epath.Path(path) / CONFIG_FILE).exists():
    return load_hf(path, mesh=mesh, rules=rules, dtype=dtype, **layout)
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


def hf_tensors(params: dict, config: Any, dtype: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array in `dtype`) for every tensor, in HF order, from a params tree."""
  params = registry.relayout_layers(config, params, scan_layers=config.scan_layers)
  for name, mapping in tensor_mappings(config).items():
    leaf = _leaf(params, mapping.path)
    array = np.asarray(jax.device_get(leaf if mapping.layer is None else leaf[mapping.layer]))
    yield name, np.ascontiguousarray(mapping.to_hf(array).astype(DTYPES[dtype]))


def write_hf_dir(params: dict, config: Any, out_dir: str, *, dtype: str = "float32",
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
  hf_config = hf_config_for(config, dtype, hf_config_base)
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
  config = config_from_hf(hf_config, scan_layers=scan_layers)
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
  to_jax = commands.add_parser("import-hf", help="Hugging Face directory (BLOOM, OPT, Llama, Qwen2, Mistral) -> params checkpoint")
  to_jax.add_argument("--hf_dir", required=True)
  to_jax.add_argument("--out", required=True)
  to_jax.add_argument("--no_scan_layers", action="store_true", help="store layers as h_0..h_{n-1}")
  for axis in partitioning.MESH_AXES:
    to_jax.add_argument(f"--mesh_{axis}", type=int, default=None,
                        help="lay the params out sharded on a (data, fsdp, tensor) mesh; -1 = the rest")
  to_hf = commands.add_parser("export-hf", help="params checkpoint -> Hugging Face directory of its family")
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
