"""Params checkpoints: exact save/restore, sharded restore, layer relayout, config checks, incomplete saves."""

import dataclasses
import json
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding

from teacherlm_jax import checkpoints, convert, partitioning
from teacherlm_jax.models import bloom, registry

from conftest import FIXTURES


def _assert_trees_equal(actual, expected) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and np.array_equal(got, want), jax.tree_util.keystr(path)


def _spec(array: jax.Array) -> tuple:
  spec = tuple(array.sharding.spec)
  return spec + (None,) * (array.ndim - len(spec))


@pytest.fixture(scope="module")
def model() -> tuple[bloom.BloomConfig, dict]:
  """Config and params (scanned layers) of the tiny HF fixture."""
  loaded, params = convert.load_hf(str(FIXTURES / "hf_bloom_tiny"))
  return loaded.config, params


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model) -> pathlib.Path:
  """`model` saved once as a params checkpoint (unsharded)."""
  config, params = model
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  checkpoints.save_params(str(path), params, config, hf_config={"model_type": "bloom", "n_head": 6}, source="test")
  return path


def test_save_then_load_is_exact(ckpt, model):
  config, params = model
  restored = checkpoints.load_params(str(ckpt))
  _assert_trees_equal(restored, params)
  assert all(leaf.sharding == SingleDeviceSharding(jax.devices()[0]) for leaf in jax.tree.leaves(restored))
  assert checkpoints.load_config(str(ckpt)) == config
  metadata = checkpoints.read_metadata(str(ckpt))
  assert metadata["hf_config"] == {"model_type": "bloom", "n_head": 6} and metadata["source"] == "test"
  assert sorted(p.name for p in ckpt.iterdir()) == ["params", "teacherlm.json"]


def test_restore_onto_a_mesh_gives_the_rule_shardings(ckpt, model):
  _, params = model
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  restored = checkpoints.load_params(str(ckpt), mesh=mesh)
  _assert_trees_equal(restored, params)
  for leaf in jax.tree.leaves(restored):
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh
  assert _spec(restored["word_embeddings"]) == ("tensor", "fsdp")
  assert _spec(restored["h"]["self_attention"]["qkv_kernel"]) == (None, "fsdp", "tensor", None, None)
  assert _spec(restored["h"]["mlp"]["wo_kernel"]) == (None, "tensor", "fsdp")
  assert _spec(restored["ln_f"]["scale"]) == ("fsdp",)
  assert {s.data.shape for s in restored["h"]["mlp"]["wi_kernel"].addressable_shards} == {(2, 24, 96)}


def test_sharded_params_save_and_load_unsharded(tmp_path, model):
  config, params = model
  mesh = partitioning.make_mesh(data=1, fsdp=4, tensor=2)
  sharded = convert.load_hf(str(FIXTURES / "hf_bloom_tiny"), mesh=mesh)[1]
  checkpoints.save_params(str(tmp_path / "ckpt"), sharded, config)
  _assert_trees_equal(checkpoints.load_params(str(tmp_path / "ckpt")), params)


def test_loading_with_scan_layers_false_relayouts_to_per_layer_params(ckpt, model):
  config, params = model
  unscanned = checkpoints.load_params(str(ckpt), dataclasses.replace(config, scan_layers=False))
  assert sorted(unscanned) == ["h_0", "h_1", "ln_f", "word_embeddings", "word_embeddings_layernorm"]
  for n in range(config.num_layers):
    _assert_trees_equal(unscanned[f"h_{n}"], jax.tree.map(lambda leaf, n=n: leaf[n], params["h"]))
  _assert_trees_equal(unscanned["ln_f"], params["ln_f"])
  tokens = np.arange(8, dtype=np.int32).reshape(1, 8)
  per_layer = jax.jit(bloom.Bloom(dataclasses.replace(config, scan_layers=False)).apply)({"params": unscanned}, tokens)
  scanned = jax.jit(bloom.Bloom(config).apply)({"params": params}, tokens)
  np.testing.assert_allclose(per_layer, scanned, atol=1e-6)


def test_per_layer_checkpoint_loads_scanned(tmp_path, model):
  config, params = model
  per_layer = dataclasses.replace(config, scan_layers=False)
  checkpoints.save_params(str(tmp_path / "ckpt"), registry.relayout_layers(config, params, scan_layers=False), per_layer)
  assert checkpoints.load_config(str(tmp_path / "ckpt")).scan_layers is False
  _assert_trees_equal(checkpoints.load_params(str(tmp_path / "ckpt"), config), params)


def test_loading_with_a_lower_param_dtype_casts(ckpt, model):
  config, params = model
  restored = checkpoints.load_params(str(ckpt), dataclasses.replace(config, param_dtype="bfloat16"))
  _assert_trees_equal(restored, jax.tree.map(lambda leaf: np.asarray(leaf).astype(ml_dtypes.bfloat16), params))


@pytest.mark.parametrize("field, value", [("hidden_size", 96), ("num_layers", 3), ("num_heads", 4),
                                          ("vocab_size", 1024)])
def test_loading_with_different_dims_names_the_field(ckpt, model, field, value):
  config, _ = model
  wanted = dataclasses.replace(config, **{field: value})
  stored = getattr(config, field)
  with pytest.raises(ValueError, match=f"{ckpt} holds a different model \\({field}: checkpoint {stored} vs "
                                       f"requested {value}\\)"):
    checkpoints.load_params(str(ckpt), wanted)


def test_directory_without_metadata_is_an_incomplete_save(tmp_path, ckpt):
  partial = tmp_path / "partial"
  shutil.copytree(ckpt, partial)
  (partial / checkpoints.METADATA_FILE).unlink()
  for load in (checkpoints.load_params, checkpoints.load_config, checkpoints.read_metadata):
    with pytest.raises(FileNotFoundError, match=f"{partial} is not a complete params checkpoint: .*teacherlm.json is "
                                                "missing \\(an interrupted save"):
      load(str(partial))


def test_saving_twice_to_one_path_is_refused(ckpt, model):
  config, params = model
  before = (ckpt / checkpoints.METADATA_FILE).read_text()
  with pytest.raises(FileExistsError, match=f"{ckpt} already holds a checkpoint"):
    checkpoints.save_params(str(ckpt), params, config, source="second")
  assert (ckpt / checkpoints.METADATA_FILE).read_text() == before
  assert json.loads(before)["source"] == "test"


def test_copy_tokenizer_files_copies_only_the_present_ones(tmp_path):
  source = tmp_path / "source"
  source.mkdir()
  (source / "tokenizer.json").write_bytes((FIXTURES / "hf_bloom_tiny" / "tokenizer.json").read_bytes())
  (source / "special_tokens_map.json").write_text('{"eos_token": "</s>"}')
  (source / "config.json").write_text("{}")
  (source / "vocab.txt").write_text("not a tokenizer file we copy")
  target = tmp_path / "target" / "nested"
  assert checkpoints.copy_tokenizer_files(str(source), str(target)) == ["tokenizer.json", "special_tokens_map.json"]
  assert sorted(p.name for p in target.iterdir()) == ["special_tokens_map.json", "tokenizer.json"]
  for name in ("tokenizer.json", "special_tokens_map.json"):
    assert (target / name).read_bytes() == (source / name).read_bytes()

  empty = tmp_path / "empty"
  empty.mkdir()
  assert checkpoints.copy_tokenizer_files(str(empty), str(tmp_path / "untouched")) == []
  assert not (tmp_path / "untouched").exists()
