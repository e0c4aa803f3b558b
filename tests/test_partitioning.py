"""Mesh construction, logical axis rules, sharded init, and sharded forward passes on an 8-device CPU mesh."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from teacherlm_jax import convert, partitioning
from teacherlm_jax.models import bloom, common

MESH_SHAPES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]  # (data, fsdp, tensor)


def test_eight_cpu_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("request_sizes,expected", [
    ((1, -1, 1), (1, 8, 1)), ((2, -1, 2), (2, 2, 2)), ((-1, 1, 2), (4, 1, 2)), ((8, 1, 1), (8, 1, 1))])
def test_mesh_shape_fills_the_rest(request_sizes, expected):
  assert partitioning.mesh_shape(8, *request_sizes) == expected


@pytest.mark.parametrize("request_sizes,message", [
    ((2, 2, 1), "data=2 fsdp=2 tensor=1 needs 4 devices, but 8 are available"),
    ((3, -1, 1), "not divisible"),
    ((-1, -1, 1), "at most one -1"),
    ((0, -1, 1), "positive")])
def test_mesh_shape_errors_name_the_axes(request_sizes, message):
  with pytest.raises(ValueError, match=message):
    partitioning.mesh_shape(8, *request_sizes)


def test_make_mesh_axes():
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.fixture(scope="module")
def hf_model(request):
  from conftest import FIXTURES
  return convert.load_hf(str(FIXTURES / "hf_bloom_tiny"))


@pytest.mark.parametrize("data,fsdp,tensor", MESH_SHAPES)
def test_sharded_logits_equal_unsharded(hf_model, hf_reference, data, fsdp, tensor):
  model, params = hf_model
  tokens = np.concatenate([hf_reference["input_ids"]] * 2)  # batch 8, divisible by every mesh
  mask = np.concatenate([hf_reference["attention_mask"]] * 2)
  expected = jax.jit(model.apply)({"params": params}, tokens, mask)

  mesh = partitioning.make_mesh(data, fsdp, tensor)
  boxed = jax.eval_shape(functools.partial(common.init_params, model), jax.random.key(0))
  shardings = partitioning.logical_shardings(boxed, mesh)
  sharded = jax.device_put(params, shardings)
  with partitioning.activation_rules(mesh):
    logits = jax.jit(model.apply)({"params": sharded}, tokens, mask)
  np.testing.assert_allclose(logits, expected, atol=1e-5)
  real = mask.astype(bool)
  assert float(np.abs(np.asarray(logits)[:4] - hf_reference["logits"])[real[:4]].max()) < 1e-4
  assert logits.sharding.spec[0] in (("data", "fsdp"), "data", "fsdp")  # batch stays split


@pytest.mark.parametrize("data,fsdp,tensor", MESH_SHAPES)
def test_params_are_sharded_as_the_rules_say(data, fsdp, tensor):
  config = bloom.BloomConfig(vocab_size=512, hidden_size=48, num_layers=2, num_heads=6)
  model = bloom.Bloom(config)
  init_fn = functools.partial(common.init_params, model)
  mesh = partitioning.make_mesh(data, fsdp, tensor)
  params = partitioning.init_sharded(init_fn, jax.random.key(0), mesh)

  qkv = params["h"]["self_attention"]["qkv_kernel"]  # [layers, embed, heads, 3, kv]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None, None)
  assert qkv.addressable_shards[0].data.shape == (2, 48 // fsdp, 6 // tensor, 3, 8)
  embeddings = params["word_embeddings"]  # [vocab, embed]
  assert embeddings.addressable_shards[0].data.shape == (512 // tensor, 48 // fsdp)
  wo = params["h"]["mlp"]["wo_kernel"]  # [layers, mlp, embed]
  assert wo.addressable_shards[0].data.shape == (2, 192 // tensor, 48 // fsdp)
  assert params["ln_f"]["scale"].addressable_shards[0].data.shape == (48 // fsdp,)

  unsharded = nn.unbox(init_fn(jax.random.key(0)))  # same values up to float rounding of jit vs eager
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-9), params, unsharded)


def test_indivisible_dimension_names_the_parameter():
  config = bloom.BloomConfig(vocab_size=512, hidden_size=48, num_layers=2, num_heads=6)
  boxed = jax.eval_shape(functools.partial(common.init_params, bloom.Bloom(config)), jax.random.key(0))
  mesh = partitioning.make_mesh(data=2, fsdp=1, tensor=4)  # 6 heads cannot split 4 ways
  with pytest.raises(ValueError, match=r"self_attention.*cannot be split 4 ways over mesh axes \('tensor',\)"):
    partitioning.logical_shardings(boxed, mesh)


def test_custom_rules_replicate_everything():
  config = bloom.BloomConfig(vocab_size=512, hidden_size=48, num_layers=2, num_heads=6)
  mesh = partitioning.make_mesh(data=8, fsdp=1, tensor=1)
  rules = [("batch", "data")]
  params = partitioning.init_sharded(functools.partial(common.init_params, bloom.Bloom(config)),
                                     jax.random.key(0), mesh, rules)
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(params))
