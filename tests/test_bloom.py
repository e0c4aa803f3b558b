"""BLOOM model: parity with transformers, ALiBi, masks and packing, KV cache, dtypes, scan/remat, param counts."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from teacherlm_jax import convert
from teacherlm_jax.models import bloom, common, registry

from conftest import FIXTURES

TINY = bloom.BloomConfig(vocab_size=64, hidden_size=24, num_layers=2, num_heads=6)


def _init(config: bloom.BloomConfig, seed: int = 0):
  model = bloom.Bloom(config)
  return model, nn.unbox(common.init_params(model, jax.random.key(seed)))


def _nonpad_max_diff(logits, reference) -> float:
  mask = reference["attention_mask"].astype(bool)
  return float(np.abs(np.asarray(logits) - reference["logits"])[mask].max())


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers_with_left_and_right_padding(hf_tiny_dir, hf_reference, scan_layers):
  model, params = convert.load_hf(str(hf_tiny_dir), scan_layers=scan_layers)
  logits = model.apply({"params": params}, hf_reference["input_ids"], hf_reference["attention_mask"])
  assert logits.shape == (4, 12, 512) and logits.dtype == jnp.float32
  assert _nonpad_max_diff(logits, hf_reference) < 1e-4


def test_left_padded_row_equals_unpadded_row(hf_tiny_dir, hf_reference):
  model, params = convert.load_hf(str(hf_tiny_dir))
  row = 1  # 4 left pads then 8 tokens
  tokens = hf_reference["input_ids"][row:row + 1, 4:]
  unpadded = model.apply({"params": params}, tokens)
  padded = model.apply({"params": params}, hf_reference["input_ids"][row:row + 1],
                       hf_reference["attention_mask"][row:row + 1])
  np.testing.assert_allclose(padded[:, 4:], unpadded, atol=1e-5)


def test_alibi_slopes_for_head_counts_that_are_not_powers_of_two():
  # BLOOM-176B has 112 heads: 64 slopes 2^(-8i/64), then 48 more at odd steps of the 128 sequence.
  slopes = bloom.alibi_slopes(112)
  np.testing.assert_allclose(slopes[:64], [2 ** (-8 * i / 64) for i in range(1, 65)], rtol=1e-6)
  np.testing.assert_allclose(slopes[64:], [2 ** (-8 * i / 128) for i in range(1, 97, 2)], rtol=1e-6)
  np.testing.assert_allclose(bloom.alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], rtol=1e-6)


def test_segment_positions_for_padding_and_packing():
  segments = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 2, 2, 2]])
  np.testing.assert_array_equal(common.segment_positions(segments),
                                [[0, 1, 0, 1, 2], [0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])


def test_packed_sequences_equal_separate_sequences():
  model, params = _init(TINY)
  a = jax.random.randint(jax.random.key(1), (1, 5), 0, 64)
  b = jax.random.randint(jax.random.key(2), (1, 3), 0, 64)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
  segments = jnp.array([[1] * 5 + [2] * 3 + [0] * 2])
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, packed, segment_ids=segments)
  np.testing.assert_allclose(logits[:, :5], apply({"params": params}, a), atol=1e-5)
  np.testing.assert_allclose(logits[:, 5:8], apply({"params": params}, b), atol=1e-5)


def test_future_tokens_do_not_change_past_logits():
  model, params = _init(TINY)
  tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 64)
  changed = tokens.at[:, 5:].set((tokens[:, 5:] + 1) % 64)
  apply = jax.jit(model.apply)
  original, edited = apply({"params": params}, tokens), apply({"params": params}, changed)
  np.testing.assert_allclose(original[:, :5], edited[:, :5], atol=1e-6)
  assert not np.allclose(original[:, 5:], edited[:, 5:])


def _decoder(model):
  """jit(params, cache, tokens, mask) -> (logits, new cache) for decode-mode calls."""
  def step(params, cache, tokens, mask):
    logits, state = model.apply({"params": params, "cache": cache}, tokens, mask, decode=True, mutable=["cache"])
    return logits, state["cache"]
  return jax.jit(step)


def _decode_step_by_step(model, params, tokens, mask, prefill: int, max_length: int):
  decode = _decoder(model)
  logits, cache = decode(params, common.init_cache(model, tokens.shape[0], max_length), tokens[:, :prefill],
                         mask[:, :prefill])
  outputs = [logits]
  for t in range(prefill, tokens.shape[1]):
    logits, cache = decode(params, cache, tokens[:, t:t + 1], mask[:, t:t + 1])
    outputs.append(logits)
  return jnp.concatenate(outputs, axis=1)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_reproduces_full_forward(hf_tiny_dir, hf_reference, scan_layers):
  model, params = convert.load_hf(str(hf_tiny_dir), scan_layers=scan_layers)
  tokens, mask = hf_reference["input_ids"][[0, 1, 3]], hf_reference["attention_mask"][[0, 1, 3]]  # left padding
  full = model.apply({"params": params}, tokens, mask)
  for prefill in (1, 6):
    stepped = _decode_step_by_step(model, params, tokens, mask, prefill, max_length=16)
    real = mask.astype(bool)
    assert float(jnp.abs(stepped - full)[real].max()) < 1e-5


def test_greedy_decoding_matches_transformers_generate(hf_tiny_dir):
  greedy = load_file(str(FIXTURES / "hf_bloom_tiny_greedy.safetensors"))
  model, params = convert.load_hf(str(hf_tiny_dir))
  prompt = jnp.asarray(greedy["prompt_ids"])
  decode = _decoder(model)
  logits, cache = decode(params, common.init_cache(model, 1, prompt.shape[1] + 8), prompt, jnp.ones_like(prompt))
  step_logits, generated = [], []
  for _ in range(8):
    step_logits.append(logits[:, -1])
    token = jnp.argmax(logits[:, -1], axis=-1)[:, None]
    generated.append(token)
    logits, cache = decode(params, cache, token, jnp.ones_like(token))
  np.testing.assert_array_equal(jnp.concatenate(generated, 1), greedy["generated_ids"])
  np.testing.assert_allclose(jnp.stack(step_logits, 1), greedy["step_logits"], atol=1e-4)


def test_scan_and_remat_do_not_change_logits_or_grads():
  tokens = jax.random.randint(jax.random.key(4), (2, 6), 0, 64)
  reference_model, reference_params = _init(TINY)
  unscanned = registry.relayout_layers(TINY, reference_params, scan_layers=False)

  def loss(model, params):
    return model.apply({"params": params}, tokens).astype(jnp.float32).std()

  reference_grads = jax.jit(jax.grad(functools.partial(loss, reference_model)))(reference_params)
  for scan_layers, policy, unroll in ((True, "full", 1), (True, "dots", 1), (True, "none", 2), (False, "none", 1),
                                      (False, "full", 1)):
    config = bloom.BloomConfig(**{**TINY.to_dict(), "scan_layers": scan_layers, "remat_policy": policy,
                                  "scan_unroll": unroll})
    model = bloom.Bloom(config)
    params = reference_params if scan_layers else unscanned
    grads = jax.jit(jax.grad(functools.partial(loss, model)))(params)
    grads = registry.relayout_layers(TINY, grads, scan_layers=True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, reference_grads)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  config = bloom.BloomConfig(**{**TINY.to_dict(), "dtype": "bfloat16"})
  model, params = _init(config)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  tokens = jax.random.randint(jax.random.key(5), (2, 6), 0, 64)
  logits = model.apply({"params": params}, tokens)
  reference = bloom.Bloom(TINY).apply({"params": params}, tokens)
  assert logits.dtype == jnp.float32
  assert float(jnp.abs(logits - reference).max()) < 0.05


def test_params_carry_logical_axis_names():
  boxed = jax.eval_shape(lambda key: common.init_params(bloom.Bloom(TINY), key), jax.random.key(0))
  names = nn.get_partition_spec(boxed)
  assert tuple(names["word_embeddings"]) == ("vocab", "embed")
  assert tuple(names["h"]["self_attention"]["qkv_kernel"]) == ("layers", "embed", "heads", None, "kv")
  assert tuple(names["h"]["self_attention"]["dense_kernel"]) == ("layers", "heads", "kv", "embed")
  assert tuple(names["h"]["mlp"]["wi_kernel"]) == ("layers", "embed", "mlp")
  assert tuple(names["ln_f"]["scale"]) == ("embed",)


def test_config_validation():
  with pytest.raises(ValueError, match="not divisible"):
    bloom.BloomConfig(hidden_size=50, num_heads=6)
  with pytest.raises(ValueError, match="remat_policy"):
    bloom.BloomConfig(remat_policy="sometimes")
  with pytest.raises(ValueError, match="unknown BloomConfig fields"):
    bloom.BloomConfig.from_dict({"hidden": 3})


def test_last_only_gives_the_logits_of_the_last_position(hf_tiny_dir, hf_reference):
  model, params = convert.load_hf(str(hf_tiny_dir))
  ids, mask = hf_reference["input_ids"][:2], hf_reference["attention_mask"][:2]  # full and left-padded rows
  last = model.apply({"params": params}, ids, mask, last_only=True)
  assert last.shape == (2, 1, model.config.vocab_size)
  np.testing.assert_allclose(last[:, 0], model.apply({"params": params}, ids, mask)[:, -1], atol=1e-6, rtol=0)
