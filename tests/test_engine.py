"""The continuous-batching engine: the same tokens as static decoding and full recomputation whichever slot, tier
or step a row enters at; freed slots refilled by the next call; K samples from one prefill."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teacherlm_jax import convert, decoding, engine, partitioning
from teacherlm_jax.models import common

from conftest import FIXTURES

RNG = np.random.default_rng(7)
PROMPTS = [list(RNG.integers(3, 500, RNG.integers(2, 30))) for _ in range(9)]


@pytest.fixture(scope="module")
def tiny():
  """The tiny BLOOM with every weight perturbed (seeded), so greedy rows do not repeat one token."""
  model, params = convert.load_hf(str(FIXTURES / "hf_bloom_tiny"))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  return model, jax.tree.unflatten(tree, [x + 0.5 * jax.random.normal(k, x.shape, x.dtype)
                                          for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def eos(tiny):
  """An EOS id that stops the greedy rows after different numbers of tokens (one the tiny model produces)."""
  model, params = tiny
  out, _ = _static(model, params, PROMPTS, decoding.DecodingConfig(max_new_tokens=12, eos_id=-1))

  def stop_steps(token):
    return {int(np.argmax(row == token)) if token in row else 12 for row in out}
  return max(sorted(set(out.ravel().tolist())), key=lambda token: len(stop_steps(token)))


def _static(model, params, prompts, config, seed=0):
  """Today's static decoding, one left-padded batch: (tokens, lengths)."""
  tokens, mask = decoding.left_pad(prompts, decoding.bucket_length(max(map(len, prompts)), 64))
  out, lengths = decoding.jit_generate(model, config, seed)(params, tokens, mask,
                                                            np.arange(len(prompts), dtype=np.int32))
  return np.asarray(out), np.asarray(lengths)


def _run(slots_engine, prompts, samples=1):
  return {(f.key, f.sample): list(f.ids) for f in slots_engine.run(
      engine.Request(i, p, i, samples) for i, p in enumerate(prompts))}


def test_greedy_slots_equal_static_decoding_and_full_recomputation(tiny, eos):
  model, params = tiny
  config = decoding.DecodingConfig(max_new_tokens=12, eos_id=eos)
  out, lengths = _static(model, params, PROMPTS, config)
  static = {i: list(out[i, :lengths[i]]) for i in range(len(PROMPTS))}
  assert len(set(lengths)) > 2 and min(lengths) < 12  # rows stop at different steps
  apply = jax.jit(model.apply)
  for i in (0, 5):  # full recomputation, no cache
    sequence = list(PROMPTS[i])
    while len(sequence) - len(PROMPTS[i]) < lengths[i]:
      sequence.append(int(jnp.argmax(apply({"params": params}, jnp.asarray([sequence]))[0, -1])))
    assert sequence[len(PROMPTS[i]):] == static[i]
  # 3 slots for 9 prompts: most rows enter late, into slots others left at different steps; 2 steps per call; two
  # tiers, rows moving up (one tier: the other tests); the last row finishes in a compacted one-slot state.
  slots = engine.Engine(model, params, config, slots=3, max_prompt_length=64, steps_per_call=2,
                        tiers=((1, 24), (2, 80)))
  got = _run(slots, PROMPTS)
  assert {i: got[(i, 0)] for i in range(len(PROMPTS))} == static
  assert slots.stats.prefills > 3 and slots.stats.moves > 0 and slots.stats.compactions == 1


def test_a_sampled_record_is_the_same_alone_in_a_full_engine_or_inserted_late(tiny, eos):
  model, params = tiny
  config = decoding.DecodingConfig(max_new_tokens=10, eos_id=eos, temperature=1.0, top_k=20)
  prompts = PROMPTS[:6]
  full_engine = engine.Engine(model, params, config, slots=8, max_prompt_length=64, seed=3, steps_per_call=2)
  full = _run(full_engine, prompts)
  assert full_engine.stats.compactions >= 1  # the last rows carried into fewer slots as the others finish
  late = _run(engine.Engine(model, params, config, slots=2, max_prompt_length=64, seed=3, steps_per_call=3),
              prompts)
  assert full == late
  alone = {f.key: list(f.ids) for f in engine.Engine(model, params, config, slots=1, max_prompt_length=64,
                                                    seed=3).run([engine.Request(5, prompts[5], 5)])}
  assert alone[5] == full[(5, 0)]
  out, lengths = _static(model, params, prompts, config, seed=3)  # the static loop's schedule
  assert all(full[(i, 0)] == list(out[i, :lengths[i]]) for i in range(len(prompts)))
  assert len({tuple(v) for v in full.values()}) > 3


def test_a_slot_freed_at_step_t_holds_the_next_prompt_in_the_next_call(tiny, eos):
  model, params = tiny
  config = decoding.DecodingConfig(max_new_tokens=12, eos_id=eos)
  slots = engine.Engine(model, params, config, slots=2, max_prompt_length=64, steps_per_call=1)
  seen = []  # the keys in the slots at every generate call, and which slots finished in it
  generate = slots.generate

  def observed(state):
    rows = [None if r is None else r[0].key for r in loop.rows]
    state, view = generate(state)
    seen.append((rows, [s for s in range(len(rows)) if view["done"][s] and rows[s] is not None]))
    return state, view
  slots.generate = observed
  loop = engine._HostLoop(slots, iter(engine.Request(i, p, i) for i, p in enumerate(PROMPTS[:5])))
  finished = [f.key for f in loop.run()]
  assert sorted(finished) == list(range(5))
  waiting = 2  # the next request to enter
  for (rows, done), (next_rows, _) in zip(seen, seen[1:]):
    for slot in done:
      if waiting < 5:
        assert next_rows[slot] == waiting, (rows, done, next_rows)
        waiting += 1
  assert waiting == 5
  assert slots.stats.compactions == 1 and len(seen[-1][0]) == 1  # the last row ran alone, in a one-slot state


def test_k_samples_from_one_prefill_equal_k_separate_runs(tiny, eos):
  model, params = tiny
  config = decoding.DecodingConfig(max_new_tokens=10, eos_id=eos, temperature=1.0)
  slots = engine.Engine(model, params, config, slots=4, max_prompt_length=64, seed=1)
  got = _run(slots, PROMPTS[:3], samples=3)
  assert slots.stats.prefilled_prompts == 3  # one prefill per prompt
  single = engine.Engine(model, params, config, slots=1, max_prompt_length=64, seed=1)
  for index in range(3):
    for k in range(3):  # a separate run of stream (index, k): its own prefill, one slot
      state = single.init_state([128])
      cache, logits, _ = single.prefill([PROMPTS[index]])
      state = single.insert(state, cache, logits, 0, 0, index, k)
      done = False
      while not done:
        state, view = single.generate(state)
        done = bool(view["done"][0])
      assert got[(index, k)] == list(view["out"][0, :view["length"][0]])
  assert got[(0, 0)] != got[(0, 1)] or got[(0, 1)] != got[(0, 2)]


def test_sharded_slots_on_a_mesh_equal_one_device(tiny, eos):
  model, params = tiny
  config = decoding.DecodingConfig(max_new_tokens=8, eos_id=eos)
  single = _run(engine.Engine(model, params, config, slots=4, max_prompt_length=64), PROMPTS[:6])
  mesh = partitioning.make_mesh(2, 2, 2)  # rows over data x fsdp = 4, heads over tensor = 2
  shardings = partitioning.logical_shardings(
      partitioning.abstract_params(functools.partial(common.init_params, model), jax.random.key(0)), mesh)
  slots = engine.Engine(model, jax.device_put(params, shardings), config, slots=8, max_prompt_length=64, mesh=mesh,
                        tiers=((4, 30), (4, 80)), steps_per_call=2)
  state = slots.init_state()
  expected = nn.logical_to_mesh_axes(common.CACHE_LOGICAL_AXES["key"], partitioning.DEFAULT_LOGICAL_AXIS_RULES)
  assert all(tier.sharding.spec == expected for tier in state["cache"]["h_0"]["self_attention"]["key"])
  assert _run(slots, PROMPTS[:6]) == single
  assert slots.stats.compactions == 1  # the last rows carried into 4 slots, sharded as before
  with pytest.raises(ValueError, match="multiple of the data-parallel mesh size 4"):
    engine.Engine(model, params, config, slots=8, max_prompt_length=64, mesh=mesh, tiers=((2, 30), (6, 80)))


def test_windows_and_tier_checks():
  assert [engine.window_bucket(c, 2000) for c in (1, 64, 65, 129, 200, 300, 700, 1100)] == [
      64, 64, 128, 192, 256, 384, 768, 1536]
  assert engine.window_bucket(1100, 1000) == 1000
  assert engine.long_tail_tiers(32, 160, 1024) == ((20, 416), (12, 1184))
  assert engine.long_tail_tiers(32, 160, 1024, row_multiple=8) == ((16, 416), (16, 1184))
  assert engine.long_tail_tiers(2, 160, 1024) == ((2, 1184),)
