"""Batched KV-cache decoding: equals full recomputation, matches transformers, batch-size invariant, samples
reproducibly per record."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from teacherlm_jax import convert, decoding, partitioning
from teacherlm_jax.models import common

from conftest import FIXTURES

PROMPTS = [[436, 327, 263, 141, 160], [77, 88], [300, 301, 302, 303, 304, 305, 306, 307], [9, 10, 11]]


@pytest.fixture(scope="module")
def tiny():
  return convert.load_hf(str(FIXTURES / "hf_bloom_tiny"))


def _generate(model, params, prompts, config, seeds=None, seed=0):
  tokens, mask = decoding.left_pad(prompts)
  seeds = jnp.asarray(seeds if seeds is not None else range(len(prompts)), jnp.int32)
  out, lengths = decoding.jit_generate(model, config, seed)(params, tokens, mask, seeds)
  return np.asarray(out), np.asarray(lengths)


def test_greedy_with_the_cache_equals_full_recomputation(tiny):
  model, params = tiny
  config = decoding.DecodingConfig(max_new_tokens=6, eos_id=-1)  # never stops early
  out, lengths = _generate(model, params, PROMPTS, config)
  apply = jax.jit(model.apply)
  for row, prompt in enumerate(PROMPTS):
    sequence = list(prompt)
    for _ in range(6):
      logits = apply({"params": params}, jnp.asarray([sequence]))
      sequence.append(int(jnp.argmax(logits[0, -1])))
    assert list(out[row]) == sequence[len(prompt):]
  assert list(lengths) == [6] * 4


def test_decoding_in_phases_with_a_growing_cache_equals_one_phase(tiny):
  model, params = tiny
  assert decoding.phase_ends(decoding.DecodingConfig(300)) == [64, 96, 144, 216, 300]
  assert decoding.phase_ends(decoding.DecodingConfig(300, phase_growth=2)) == [64, 128, 256, 300]
  assert decoding.phase_ends(decoding.DecodingConfig(7, first_phase_tokens=2)) == [2, 3, 5, 7]
  assert decoding.phase_ends(decoding.DecodingConfig(9, first_phase_tokens=1, phase_growth=1.01)) == list(range(1, 10))
  assert decoding.phase_ends(decoding.DecodingConfig(7, first_phase_tokens=0)) == [7]
  with pytest.raises(ValueError, match="phase_growth must be > 1"):
    decoding.DecodingConfig(7, phase_growth=1.0)
  for temperature in (0.0, 1.0):
    one, one_lengths = _generate(model, params, PROMPTS, decoding.DecodingConfig(
        7, eos_id=-1, temperature=temperature, first_phase_tokens=0))
    phased, phased_lengths = _generate(model, params, PROMPTS, decoding.DecodingConfig(
        7, eos_id=-1, temperature=temperature, first_phase_tokens=2))
    np.testing.assert_array_equal(phased, one)
    np.testing.assert_array_equal(phased_lengths, one_lengths)
  # a row whose sampled 4th or 5th token is new to it stops there, inside the third phase; the others go on
  row, step = next((r, i) for r in range(len(PROMPTS)) for i in (3, 4) if one[r, i] not in one[r, :i])
  stopped, lengths = _generate(model, params, PROMPTS, decoding.DecodingConfig(
      7, eos_id=int(one[row, step]), temperature=1.0, first_phase_tokens=2))
  assert lengths[row] == step + 1 and not stopped[row, step + 1:].any()
  np.testing.assert_array_equal(stopped[row, :step + 1], one[row, :step + 1])


def test_greedy_matches_transformers_generate(tiny):
  model, params = tiny
  reference = load_file(str(FIXTURES / "hf_bloom_tiny_greedy.safetensors"))
  out, _ = _generate(model, params, [list(reference["prompt_ids"][0])], decoding.DecodingConfig(8, eos_id=-1))
  np.testing.assert_array_equal(out[0], reference["generated_ids"][0])


def test_batch_size_1_and_8_give_the_same_greedy_outputs(tiny):
  model, params = tiny
  prompts = PROMPTS * 2
  config = decoding.DecodingConfig(max_new_tokens=5, eos_id=-1)
  batched, _ = _generate(model, params, prompts, config)
  for row, prompt in enumerate(prompts):
    single, _ = _generate(model, params, [prompt], config, seeds=[row])
    np.testing.assert_array_equal(single[0], batched[row])


def test_sampling_depends_on_the_record_not_the_batch(tiny):
  model, params = tiny
  config = decoding.DecodingConfig(max_new_tokens=6, eos_id=-1, temperature=1.0, top_k=50, top_p=0.9)
  forward, _ = _generate(model, params, PROMPTS, config, seeds=[10, 11, 12, 13], seed=3)
  backward, _ = _generate(model, params, PROMPTS[::-1], config, seeds=[13, 12, 11, 10], seed=3)
  np.testing.assert_array_equal(forward, backward[::-1])
  other_seed, _ = _generate(model, params, PROMPTS, config, seeds=[10, 11, 12, 13], seed=4)
  assert not np.array_equal(forward, other_seed)


def test_rows_stop_at_eos(tiny):
  model, params = tiny
  free, _ = _generate(model, params, PROMPTS[:2], decoding.DecodingConfig(max_new_tokens=6, eos_id=-1))
  eos = int(free[0, 0])  # make row 0's first token the EOS
  out, lengths = _generate(model, params, PROMPTS[:2], decoding.DecodingConfig(max_new_tokens=6, eos_id=eos))
  assert lengths[0] == 1 and out[0, 0] == eos and list(out[0, 1:]) == [0] * 5
  expected = list(free[1]).index(eos) + 1 if eos in free[1] else 6
  assert lengths[1] == expected and list(out[1, :expected]) == list(free[1, :expected])
  both, both_lengths = _generate(model, params, [PROMPTS[0]] * 2, decoding.DecodingConfig(6, eos_id=eos))
  assert list(both_lengths) == [1, 1] and not both[:, 1:].any()


def test_top_k_and_top_p_filtering():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  top2 = decoding.filter_logits(logits, decoding.DecodingConfig(temperature=1.0, top_k=2))
  assert np.isfinite(np.asarray(top2)).tolist() == [[True, True, False, False]]
  nucleus = decoding.filter_logits(logits, decoding.DecodingConfig(temperature=1.0, top_p=0.75))
  assert np.isfinite(np.asarray(nucleus)).tolist() == [[True, True, False, False]]
  everything = decoding.filter_logits(logits, decoding.DecodingConfig(temperature=2.0))
  np.testing.assert_allclose(everything, logits / 2.0)


def test_first_max_index_is_argmax_ties_included():
  logits = np.random.default_rng(0).normal(size=(6, 300)).astype(np.float32)
  logits[1, [7, 200]] = 9.0  # a tie: the first index wins, as with argmax
  logits[2, :] = -np.inf
  logits[2, 299] = 0.0
  logits[3, :] = 1.0
  np.testing.assert_array_equal(decoding.first_max_index(jnp.asarray(logits)), np.argmax(logits, axis=-1))


def test_sample_categorical_inverts_the_cumulative_distribution():
  """Evenly spaced uniforms give each token a share of the draws equal to its probability (within one draw), over a
  vocabulary that is not a multiple of the block size; tokens at -inf are never drawn, not even at u = 0 or u -> 1."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=300).astype(np.float32) * 2
  logits[rng.choice(300, 120, replace=False)] = -np.inf
  logits[:5] = logits[290:] = -np.inf  # zero mass in the first and in the (partial) last block's tail
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  draws = 20000
  uniform = np.concatenate([[0.0, np.nextafter(np.float32(1), np.float32(0))], (np.arange(draws) + 0.5) / draws])
  rows = jnp.broadcast_to(jnp.asarray(logits), (len(uniform), 300))
  tokens = np.asarray(jax.jit(decoding.sample_categorical)(jnp.asarray(uniform, jnp.float32), rows))
  assert np.isfinite(logits[tokens]).all()
  counts = np.bincount(tokens[2:], minlength=300)
  np.testing.assert_allclose(counts, probs * draws, atol=1.5)
  assert np.array_equal(tokens[2:], np.sort(tokens[2:]))  # monotone in u: the inverse of the CDF


def test_sampled_tokens_follow_the_model_distribution():
  """`next_tokens` at temperature 1 over many keys: token frequencies match softmax(logits) (chi-square)."""
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(1, 50)).astype(np.float32))
  keys = jax.random.split(jax.random.key(0), 40000)
  config = decoding.DecodingConfig(temperature=1.0)
  tokens = jax.jit(jax.vmap(lambda key: decoding.next_tokens(logits, key[None], config)[0]))(keys)
  expected = np.asarray(jax.nn.softmax(logits[0])) * len(keys)
  chi_square = (((np.bincount(np.asarray(tokens), minlength=50) - expected) ** 2) / expected).sum()
  assert chi_square < 90  # 49 degrees of freedom: p < 1e-3 above 85


def test_rows_stop_at_a_stop_sequence(tiny):
  model, params = tiny
  free, _ = _generate(model, params, PROMPTS, decoding.DecodingConfig(max_new_tokens=8, eos_id=-1))
  stop = tuple(int(t) for t in free[0, 2:4])  # row 0's third and fourth tokens
  out, lengths = _generate(model, params, PROMPTS, decoding.DecodingConfig(8, eos_id=-1, stop_sequences=(stop,)))
  for row in range(len(PROMPTS)):
    ends = [j + 1 for j in range(1, 8) if tuple(free[row, j - 1:j + 1]) == stop]
    expected = ends[0] if ends else 8
    assert lengths[row] == expected, row
    assert list(out[row, :expected]) == list(free[row, :expected]) and not out[row, expected:].any()
  assert lengths[0] <= 4


def test_sharded_generation_on_a_mesh_equals_one_device(tiny):
  model, params = tiny
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  _, sharded = convert.load_hf(str(FIXTURES / "hf_bloom_tiny"), mesh=mesh)
  assert sharded["word_embeddings"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  for config in (decoding.DecodingConfig(6, eos_id=-1), decoding.DecodingConfig(6, eos_id=-1, temperature=1.0)):
    expected, expected_lengths = _generate(model, params, PROMPTS, config)
    tokens, mask = decoding.left_pad(PROMPTS)
    phased = dataclasses.replace(config, first_phase_tokens=2)  # and the cache grows on the mesh: 2, 3, 5, 6
    with partitioning.activation_rules(mesh):
      out, lengths = decoding.jit_generate(model, phased, mesh=mesh)(sharded, tokens, mask, np.arange(4, dtype=np.int32))
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(lengths, expected_lengths)


def test_the_cache_is_sharded_by_the_logical_axis_rules(tiny):
  model, _ = tiny
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  with partitioning.activation_rules(mesh):
    cache = jax.jit(lambda: decoding.constrain_cache(common.init_cache(model, 4, 16)))()
  layers = cache["h"]["self_attention"]  # scanned layers: a leading layer axis
  rows = ("data", "fsdp")
  assert layers["key"].shape == (2, 4, 6, 16, 8)  # head-major: [layers, batch, heads, length, head_dim]
  assert layers["key"].sharding.spec == jax.sharding.PartitionSpec(None, rows, "tensor")
  assert layers["value"].sharding.spec == layers["key"].sharding.spec
  assert layers["positions"].sharding.spec == jax.sharding.PartitionSpec(None, rows)
  assert cache["valid_count"].sharding.spec == jax.sharding.PartitionSpec(rows)


def test_length_buckets_and_batch_plans():
  assert [decoding.bucket_length(n, 100) for n in (1, 16, 17, 33, 64, 65, 99)] == [16, 16, 32, 48, 64, 80, 100]
  assert [decoding.bucket_length(n, 4096) for n in (100, 130, 1000, 1025)] == [112, 160, 1024, 1280]
  with pytest.raises(ValueError, match="longer than the maximum 100"):
    decoding.bucket_length(101, 100)
  plan = decoding.plan_batches([5, 40, 3, 18, 40, 7], batch_size=2, max_length=64)
  assert plan == [([2, 0], 16), ([5, 3], 32), ([1, 4], 48)]
  assert sorted(i for indices, _ in plan for i in indices) == list(range(6))


def test_a_partial_batch_is_padded_to_few_shapes():
  assert [decoding.batch_rows(n, 32) for n in (32, 40, 1, 3, 4, 5, 17, 31)] == [32, 32, 1, 4, 4, 8, 32, 32]
  assert [decoding.batch_rows(n, 32, row_multiple=8) for n in (1, 5, 9, 20)] == [8, 8, 16, 32]
  assert decoding.batch_rows(5, 24, row_multiple=8) == 8 and decoding.batch_rows(13, 24, row_multiple=8) == 16
  assert decoding.batch_rows(17, 24, row_multiple=8) == 24


def test_decoded_text_is_cut_at_the_first_stop_string():
  assert decoding.cut_at_stop_strings("a b\nQ: c\n\nd", ["\n\n", "\nQ:"]) == ("a b", True)
  assert decoding.cut_at_stop_strings("a b", ["\nQ:"]) == ("a b", False)
  assert decoding.cut_at_stop_strings("a b", []) == ("a b", False)


def test_left_pad_and_config_validation():
  tokens, mask = decoding.left_pad([[5, 6], [7]], length=3)
  np.testing.assert_array_equal(tokens, [[0, 5, 6], [0, 0, 7]])
  np.testing.assert_array_equal(mask, [[0, 1, 1], [0, 0, 1]])
  with pytest.raises(ValueError, match="more than the padded length 1"):
    decoding.left_pad([[5, 6]], length=1)
  with pytest.raises(ValueError, match="top_p"):
    decoding.DecodingConfig(top_p=0.0)
  assert decoding.DecodingConfig(stop_sequences=([1, 2], [])).stop_sequences == ((1, 2),)
