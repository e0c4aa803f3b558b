"""HF BLOOM <-> params checkpoints: bit-exact round trips, dtypes, old layouts, sharding, errors, streaming."""

import inspect
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tracemalloc
from typing import Callable, Optional

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from safetensors.numpy import load_file, save_file

from teacherlm_jax import checkpoints, convert, partitioning
from teacherlm_jax.models import registry

from conftest import FIXTURES

SINGLE = FIXTURES / "hf_bloom_tiny"
SHARDED = FIXTURES / "hf_bloom_tiny_sharded"
REPO = FIXTURES.parent.parent
SHARD_FILES = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]


def _read_hf_tensors(hf_dir: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of every safetensors file in `hf_dir` (names must be unique across files)."""
  tensors: dict[str, np.ndarray] = {}
  for path in sorted(hf_dir.glob("*.safetensors")):
    for name, array in load_file(str(path)).items():
      assert name not in tensors, f"{name} is in two files"
      tensors[name] = array
  return tensors


def _assert_bit_identical(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
  assert sorted(actual) == sorted(expected)
  for name, want in expected.items():
    got = actual[name]
    assert (got.dtype, got.shape) == (want.dtype, want.shape), name
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), f"{name} differs"


def _assert_trees_equal(actual, expected) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and np.array_equal(got, want), jax.tree_util.keystr(path)


def _rewrite(target: pathlib.Path, *, source: pathlib.Path = SINGLE,
             tensors: Optional[Callable[[dict], dict]] = None, config: Optional[Callable[[dict], dict]] = None
             ) -> pathlib.Path:
  """A copy of the single-file fixture with its tensors and/or config.json passed through the given edits."""
  shutil.copytree(source, target)
  if tensors is not None:
    path = str(target / "model.safetensors")
    save_file(tensors(load_file(path)), path, metadata={"format": "pt"})
  if config is not None:
    (target / "config.json").write_text(json.dumps(config(json.loads((target / "config.json").read_text()))))
  return target


def _import(hf_dir: pathlib.Path, out: pathlib.Path, *flags: str) -> pathlib.Path:
  assert convert.main(["import-hf", "--hf_dir", str(hf_dir), "--out", str(out), *flags]) == 0
  return out


def _export(ckpt: pathlib.Path, out: pathlib.Path, *flags: str) -> pathlib.Path:
  assert convert.main(["export-hf", "--ckpt", str(ckpt), "--out", str(out), *flags]) == 0
  return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, pathlib.Path]:
  """Both fixtures imported once: the single file through `convert.main`, the shards through `python -m`."""
  root = tmp_path_factory.mktemp("ckpts")
  _import(SINGLE, root / "single")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  result = subprocess.run(
      [sys.executable, "-m", "teacherlm_jax.convert", "import-hf", "--hf_dir", str(SHARDED), "--out",
       str(root / "sharded")], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stderr
  assert f"wrote params checkpoint {root / 'sharded'}" in result.stdout
  return {"single": root / "single", "sharded": root / "sharded"}


@pytest.fixture(scope="module")
def reference_params() -> dict:
  """The single-file fixture loaded in memory (unsharded, scanned layers)."""
  return convert.load_hf(str(SINGLE))[1]


# ----------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("source", ["single", "sharded"])
def test_import_then_export_is_bit_identical(ckpts, tmp_path, source):
  hf_dir = {"single": SINGLE, "sharded": SHARDED}[source]
  out = _export(ckpts[source], tmp_path / "export")
  assert sorted(p.name for p in out.iterdir()) == [
      "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
  exported = load_file(str(out / "model.safetensors"))
  _assert_bit_identical(exported, _read_hf_tensors(hf_dir))
  assert len(exported) == 29 and all(name.startswith("transformer.") for name in exported)
  assert "lm_head.weight" not in exported and "transformer.lm_head.weight" not in exported

  original = json.loads((hf_dir / "config.json").read_text())
  config = json.loads((out / "config.json").read_text())
  for key in ("model_type", "architectures", "vocab_size", "hidden_size", "n_layer", "n_head", "layer_norm_epsilon",
              "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "dtype",
              "apply_residual_connection_post_layernorm"):
    assert config[key] == original[key], key
  assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


def test_sharded_export_writes_a_valid_index_and_reimports_identically(ckpts, tmp_path, reference_params):
  out = _export(ckpts["single"], tmp_path / "export", "--max_shard_size", "100KB")
  files = sorted(p.name for p in out.glob("*.safetensors"))
  assert len(files) >= 3 and files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in
                                       range(1, len(files) + 1)]
  index = json.loads((out / convert.INDEX_FILE).read_text())
  tensors = {}
  for file_name in files:
    shard = load_file(str(out / file_name))
    assert len(shard) == 1 or sum(a.nbytes for a in shard.values()) <= 100_000, file_name
    for name, array in shard.items():
      assert index["weight_map"][name] == file_name
      assert name not in tensors
      tensors[name] = array
  assert sorted(index["weight_map"]) == sorted(tensors)
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values()) == 81312 * 4
  _assert_bit_identical(tensors, _read_hf_tensors(SINGLE))
  _assert_trees_equal(convert.load_hf(str(out))[1], reference_params)


def test_load_model_reads_every_checkpoint_kind_in_either_layer_layout(ckpts, reference_params):
  """A params checkpoint (stored scanned) and a Hugging Face directory load as they are or per layer
  (`scan_layers=False`, what decoding runs), with the same weights either way."""
  per_layer = registry.relayout_layers(convert.config_from_hf(convert.read_hf_config(str(SINGLE))), reference_params,
                                       scan_layers=False)
  for path in (ckpts["single"], SINGLE):
    model, params = convert.load_model(str(path))
    assert model.config.scan_layers and "h" in params
    _assert_trees_equal(params, reference_params)
    model, params = convert.load_model(str(path), scan_layers=False)
    assert not model.config.scan_layers and sorted(k for k in params if k.startswith("h")) == ["h_0", "h_1"]
    _assert_trees_equal(params, per_layer)


def test_parse_size_uses_decimal_units():
  assert convert.parse_size("100KB") == 100_000
  assert convert.parse_size("5GB") == 5 * 10**9
  assert convert.parse_size("1.5mb") == 1_500_000
  assert convert.parse_size("12345") == 12345
  with pytest.raises(ValueError, match="cannot parse size '5 GiB'"):
    convert.parse_size("5 GiB")


@pytest.mark.parametrize("dtype_key", ["dtype", "torch_dtype"])
def test_bfloat16_checkpoint_exports_bit_identical_bfloat16(tmp_path, dtype_key):
  def to_bf16_config(config: dict) -> dict:
    config = {key: value for key, value in config.items() if key != "dtype"}
    return {**config, dtype_key: "bfloat16"}
  hf_dir = _rewrite(tmp_path / "hf_bf16", tensors=lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()},
                    config=to_bf16_config)
  original = load_file(str(hf_dir / "model.safetensors"))
  assert all(a.dtype == ml_dtypes.bfloat16 for a in original.values())
  ckpt = _import(hf_dir, tmp_path / "ckpt")

  as_bf16 = _export(ckpt, tmp_path / "bf16")
  _assert_bit_identical(load_file(str(as_bf16 / "model.safetensors")), original)
  assert json.loads((as_bf16 / "config.json").read_text())["dtype"] == "bfloat16"

  as_f32 = _export(ckpt, tmp_path / "f32", "--dtype", "float32")
  _assert_bit_identical(load_file(str(as_f32 / "model.safetensors")),
                        {k: v.astype(np.float32) for k, v in original.items()})
  config = json.loads((as_f32 / "config.json").read_text())
  assert config["dtype"] == "float32" and "torch_dtype" not in config


# ----------------------------------------------------------------------------------------------- other layouts


def _unprefixed(tensors: dict) -> dict:
  return {name.removeprefix("transformer."): array for name, array in tensors.items()}


def _with_tied_head(tensors: dict) -> dict:
  return {**tensors, "lm_head.weight": tensors["transformer.word_embeddings.weight"].copy()}


def _old_config_keys(config: dict) -> dict:
  """bloom-560m style: `n_embed` and `num_attention_heads` instead of `hidden_size` and `n_head`."""
  config = dict(config)
  config["n_embed"], config["num_attention_heads"] = config.pop("hidden_size"), config.pop("n_head")
  return config


@pytest.mark.parametrize("tensors, config", [
    (_unprefixed, None),
    (None, _old_config_keys),
    (_with_tied_head, None),
    (lambda t: _unprefixed(_with_tied_head(t)), _old_config_keys),
], ids=["unprefixed_names", "n_embed_num_attention_heads", "tied_lm_head", "all_three"])
def test_old_bigscience_layouts_import_to_the_same_params(tmp_path, reference_params, tensors, config):
  hf_dir = _rewrite(tmp_path / "hf", tensors=tensors, config=config)
  _assert_trees_equal(convert.load_hf(str(hf_dir))[1], reference_params)
  out = _export(_import(hf_dir, tmp_path / "ckpt"), tmp_path / "export")
  _assert_bit_identical(load_file(str(out / "model.safetensors")), load_file(str(SINGLE / "model.safetensors")))
  exported_config = json.loads((out / "config.json").read_text())
  assert (exported_config["hidden_size"], exported_config["n_head"], exported_config["n_layer"]) == (48, 6, 2)
  assert "n_embed" not in exported_config and "num_attention_heads" not in exported_config


def test_pytorch_pickles_next_to_safetensors_are_never_opened(tmp_path, reference_params):
  hf_dir = _rewrite(tmp_path / "hf")
  (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")
  _assert_trees_equal(convert.load_hf(str(hf_dir))[1], reference_params)


def test_untied_lm_head_is_refused(tmp_path):
  def untied(tensors: dict) -> dict:
    return {**tensors, "lm_head.weight": tensors["transformer.word_embeddings.weight"] + np.float32(1e-3)}
  hf_dir = _rewrite(tmp_path / "hf", tensors=untied)
  with pytest.raises(convert.ConversionError,
                     match=re.escape(f"{hf_dir / 'model.safetensors'}: tensor 'lm_head.weight' differs from the "
                                     "embeddings, but the model ties them")):
    convert.load_hf(str(hf_dir))


# ----------------------------------------------------------------------------------------------- sharding


def _spec(array: jax.Array) -> tuple:
  spec = tuple(array.sharding.spec)
  return spec + (None,) * (array.ndim - len(spec))


def test_load_on_a_mesh_shards_by_the_rules_and_keeps_the_logits(hf_reference, reference_params):
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  model, params = convert.load_hf(str(SINGLE), mesh=mesh)
  for leaf in jax.tree.leaves(params):
    assert isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh
  expected = {
      ("word_embeddings",): ("tensor", "fsdp"),
      ("word_embeddings_layernorm", "scale"): ("fsdp",),
      ("ln_f", "bias"): ("fsdp",),
      ("h", "input_layernorm", "scale"): (None, "fsdp"),
      ("h", "self_attention", "qkv_kernel"): (None, "fsdp", "tensor", None, None),
      ("h", "self_attention", "qkv_bias"): (None, "tensor", None, None),
      ("h", "self_attention", "dense_kernel"): (None, "tensor", None, "fsdp"),
      ("h", "self_attention", "dense_bias"): (None, "fsdp"),
      ("h", "mlp", "wi_kernel"): (None, "fsdp", "tensor"),
      ("h", "mlp", "wi_bias"): (None, "tensor"),
      ("h", "mlp", "wo_kernel"): (None, "tensor", "fsdp"),
  }
  for path, spec in expected.items():
    leaf = params
    for key in path:
      leaf = leaf[key]
    assert _spec(leaf) == spec, path
  qkv = params["h"]["self_attention"]["qkv_kernel"]
  assert qkv.shape == (2, 48, 6, 3, 8) and {s.data.shape for s in qkv.addressable_shards} == {(2, 24, 3, 3, 8)}
  assert {s.data.shape for s in params["word_embeddings"].addressable_shards} == {(256, 24)}
  _assert_trees_equal(params, reference_params)

  ids, mask = hf_reference["input_ids"], hf_reference["attention_mask"]
  apply = jax.jit(model.apply)
  with partitioning.activation_rules(mesh):
    sharded = apply({"params": params}, ids, mask)
  assert _spec(sharded) == (("data", "fsdp"), None, "tensor")
  unsharded = apply({"params": reference_params}, ids, mask)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(unsharded), atol=1e-5, rtol=0)
  real = mask.astype(bool)
  assert float(np.abs(np.asarray(sharded) - hf_reference["logits"])[real].max()) < 1e-4


def test_cli_import_onto_a_mesh(tmp_path, capsys, reference_params):
  ckpt = _import(SHARDED, tmp_path / "ckpt", "--mesh_fsdp", "4", "--mesh_tensor", "2")
  mesh = partitioning.make_mesh(data=1, fsdp=4, tensor=2)
  restored = checkpoints.load_params(str(ckpt), mesh=mesh)
  _assert_trees_equal(restored, reference_params)
  assert _spec(restored["word_embeddings"]) == ("tensor", "fsdp")
  assert {s.data.shape for s in restored["word_embeddings"].addressable_shards} == {(256, 12)}

  capsys.readouterr()
  assert convert.main(["import-hf", "--hf_dir", str(SINGLE), "--out", str(tmp_path / "bad"), "--mesh_fsdp", "3"]) == 1
  assert re.search(r"error: mesh data=1 fsdp=3 tensor=1 needs 3 devices, but 8", capsys.readouterr().err)
  assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------- bad input


def _edit_json(path: pathlib.Path, edit: Callable[[dict], dict]) -> None:
  path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _no_config(tmp: pathlib.Path):
  hf_dir = _rewrite(tmp / "hf")
  (hf_dir / "config.json").unlink()
  return hf_dir, re.escape(f"{hf_dir / 'config.json'}: missing")


def _invalid_config_json(tmp: pathlib.Path):
  hf_dir = _rewrite(tmp / "hf")
  (hf_dir / "config.json").write_text('{"model_type": "bloom",')
  return hf_dir, re.escape(f"{hf_dir / 'config.json'}: invalid JSON")


def _gpt2(tmp: pathlib.Path):
  hf_dir = _rewrite(tmp / "hf", config=lambda c: {**c, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
  return hf_dir, re.escape(f"{hf_dir / 'config.json'}: model_type='gpt2', architectures=['GPT2LMHeadModel']: "
                           "not a supported family (model_type one of ['bloom', 'llama', 'mistral', 'opt', 'qwen2'])")


def _heads_do_not_divide(tmp: pathlib.Path):
  hf_dir = _rewrite(tmp / "hf", config=lambda c: {**c, "n_head": 5})
  return hf_dir, re.escape("config.json: hidden_size=48 is not divisible by num_heads=5")


def _missing_tensor(tmp: pathlib.Path):
  hf_dir = _rewrite(tmp / "hf", tensors=lambda t: {k: v for k, v in t.items() if k != "transformer.ln_f.bias"})
  return hf_dir, re.escape(f"{hf_dir}: missing tensors ['transformer.ln_f.bias'] (1 of 29)")


def _misnamed_tensor(tmp: pathlib.Path):
  old = "transformer.h.1.mlp.dense_4h_to_h.weight"
  hf_dir = _rewrite(tmp / "hf", tensors=lambda t: {k + "s" if k == old else k: v for k, v in t.items()})
  return hf_dir, re.escape(f"{hf_dir / 'model.safetensors'}: unexpected tensor '{old}s'")


def _duplicate_tensor(tmp: pathlib.Path):
  hf_dir = _rewrite(tmp / "hf", tensors=lambda t: {**t, "ln_f.bias": t["transformer.ln_f.bias"]})
  return hf_dir, re.escape(f"{hf_dir / 'model.safetensors'}: tensor 'transformer.ln_f.bias' appears twice")


def _transposed_tensor(tmp: pathlib.Path):
  name = "transformer.h.1.mlp.dense_h_to_4h.weight"
  hf_dir = _rewrite(tmp / "hf", tensors=lambda t: {**t, name: np.ascontiguousarray(t[name].T)})
  return hf_dir, re.escape(f"{hf_dir / 'model.safetensors'}: tensor '{name}' has shape (48, 192), expected (192, 48)")


def _short_qkv(tmp: pathlib.Path):
  name = "transformer.h.0.self_attention.query_key_value.weight"
  hf_dir = _rewrite(tmp / "hf", tensors=lambda t: {**t, name: np.ascontiguousarray(t[name][:96])})
  return hf_dir, re.escape(f"{hf_dir / 'model.safetensors'}: tensor '{name}' has shape (96, 48), expected (144, 48)")


def _config_vocab_size(tmp: pathlib.Path):
  hf_dir = _rewrite(tmp / "hf", config=lambda c: {**c, "vocab_size": 500})
  return hf_dir, re.escape(f"{hf_dir / 'model.safetensors'}: tensor 'transformer.word_embeddings.weight' has shape "
                           "(512, 48), expected (500, 48) from config.json")


def _config_more_layers(tmp: pathlib.Path):
  hf_dir = _rewrite(tmp / "hf", config=lambda c: {**c, "n_layer": 3})
  return hf_dir, re.escape(f"{hf_dir}: missing tensors ['transformer.h.2.input_layernorm.bias', ") + r".*\(12 of 41\)"


def _config_fewer_layers(tmp: pathlib.Path):
  hf_dir = _rewrite(tmp / "hf", config=lambda c: {**c, "n_layer": 1})
  return hf_dir, re.escape(f"{hf_dir / 'model.safetensors'}: unexpected tensor 'transformer.h.1.") + r"\S+' \(not a " \
      r"parameter of this 1-layer bloom model\)"


def _truncated(keep: Callable[[int], int]):
  def make(tmp: pathlib.Path):
    hf_dir = _rewrite(tmp / "hf")
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])
    return hf_dir, re.escape(f"{path}: not a readable safetensors file")
  return make


def _pickle_only(tmp: pathlib.Path):
  hf_dir = tmp / "hf"
  hf_dir.mkdir()
  shutil.copy(SINGLE / "config.json", hf_dir / "config.json")
  (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")
  return hf_dir, re.escape(f"{hf_dir}: neither model.safetensors nor model.safetensors.index.json found (found "
                           "['pytorch_model.bin']: PyTorch pickles are never loaded")


def _missing_shard(tmp: pathlib.Path):
  hf_dir = tmp / "hf"
  shutil.copytree(SHARDED, hf_dir)
  (hf_dir / SHARD_FILES[2]).unlink()
  return hf_dir, re.escape(f"{hf_dir / SHARD_FILES[2]}: missing, but model.safetensors.index.json lists tensors "
                           "['transformer.h.0.mlp.dense_4h_to_h.bias'")


def _index_points_to_wrong_shard(tmp: pathlib.Path):
  hf_dir = tmp / "hf"
  shutil.copytree(SHARDED, hf_dir)
  _edit_json(hf_dir / convert.INDEX_FILE, lambda index: {
      **index, "weight_map": {**index["weight_map"], "transformer.ln_f.bias": SHARD_FILES[0]}})
  return hf_dir, re.escape(f"{hf_dir / SHARD_FILES[0]}: tensors ['transformer.ln_f.bias'] are listed in "
                           "model.safetensors.index.json but not in the file")


BAD_INPUTS = {
    "no_config": _no_config, "invalid_config_json": _invalid_config_json, "gpt2": _gpt2,
    "heads_do_not_divide": _heads_do_not_divide, "missing_tensor": _missing_tensor,
    "misnamed_tensor": _misnamed_tensor, "duplicate_tensor": _duplicate_tensor,
    "transposed_tensor": _transposed_tensor, "short_qkv": _short_qkv, "config_vocab_size": _config_vocab_size,
    "config_more_layers": _config_more_layers, "config_fewer_layers": _config_fewer_layers,
    "truncated_half": _truncated(lambda n: n // 2), "truncated_3_bytes": _truncated(lambda n: n - 3),
    "truncated_header": _truncated(lambda n: 20), "pickle_only": _pickle_only, "missing_shard": _missing_shard,
    "index_points_to_wrong_shard": _index_points_to_wrong_shard,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_a_conversion_error_naming_file_and_tensor(tmp_path, capsys, case):
  hf_dir, message = BAD_INPUTS[case](tmp_path)
  with pytest.raises(convert.ConversionError, match=message):
    convert.load_hf(str(hf_dir))
  capsys.readouterr()
  assert convert.main(["import-hf", "--hf_dir", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 1
  captured = capsys.readouterr()
  assert re.search("^error: " + message, captured.err, re.MULTILINE), captured.err
  assert "Traceback" not in captured.err and captured.out == ""
  assert not (tmp_path / "ckpt").exists()


def test_export_of_a_directory_that_is_not_a_checkpoint_fails_cleanly(tmp_path, capsys):
  assert convert.main(["export-hf", "--ckpt", str(SINGLE), "--out", str(tmp_path / "out")]) == 1
  assert re.search(r"^error: .*teacherlm\.json is missing", capsys.readouterr().err, re.MULTILINE)
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- streaming


def _index_file_order() -> list[str]:
  """Shard files in order of their first tensor in the index's weight_map."""
  weight_map = json.loads((SHARDED / convert.INDEX_FILE).read_text())["weight_map"]
  return list(dict.fromkeys(weight_map.values()))


def test_iter_hf_tensors_streams_each_shard_in_index_order():
  weight_map = json.loads((SHARDED / convert.INDEX_FILE).read_text())["weight_map"]
  lazy = convert.iter_hf_tensors(str(SHARDED / "does_not_exist"))
  assert inspect.isgenerator(lazy)  # nothing is read until the first tensor is asked for
  with pytest.raises(convert.ConversionError, match="does_not_exist: neither model.safetensors"):
    next(lazy)

  tensors = convert.iter_hf_tensors(str(SHARDED))
  assert inspect.isgenerator(tensors)
  visits, seen = [], {}
  for file_name, name, array in tensors:
    file_name = pathlib.Path(file_name).name
    if not visits or visits[-1] != file_name:
      visits.append(file_name)
    assert weight_map[name] == file_name and name not in seen
    seen[name] = array
  assert visits == _index_file_order() and sorted(visits) == SHARD_FILES  # every file once, one after the other
  _assert_bit_identical(seen, _read_hf_tensors(SHARDED))


def test_tensors_of_earlier_shards_arrive_before_a_later_shard_is_read(tmp_path):
  hf_dir = tmp_path / "hf"
  shutil.copytree(SHARDED, hf_dir)
  last = _index_file_order()[-1]
  (hf_dir / last).write_bytes((hf_dir / last).read_bytes()[:1000])
  weight_map = json.loads((hf_dir / convert.INDEX_FILE).read_text())["weight_map"]
  received = []
  with pytest.raises(convert.ConversionError, match=re.escape(f"{hf_dir / last}: not a readable safetensors")):
    for _, name, _ in convert.iter_hf_tensors(str(hf_dir)):
      received.append(name)
  assert sorted(received) == sorted(name for name, file_name in weight_map.items() if file_name != last)


def test_iter_hf_tensors_holds_one_tensor_at_a_time():
  """Peak traced memory while streaming the single file stays near its largest tensor, well below the whole file."""
  sizes = [array.nbytes for _, _, array in convert.iter_hf_tensors(str(SINGLE))]  # also warms up imports
  tracing = tracemalloc.is_tracing()
  if not tracing:
    tracemalloc.start()
  try:
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    for _ in convert.iter_hf_tensors(str(SINGLE)):
      pass
    _, peak = tracemalloc.get_traced_memory()
  finally:
    if not tracing:
      tracemalloc.stop()
  assert peak - before < 2 * max(sizes) < sum(sizes), (peak - before, max(sizes), sum(sizes))
