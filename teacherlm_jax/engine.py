"""Continuous batching: a decode state of B slots that finished rows leave and new prompts enter at once.

The shape is JetStream's, in JAX: `prefill` runs a bucket of new prompts once (one forward pass, a fresh KV cache of
the bucket's length); `insert` copies a prefilled prompt into a free slot of the decode state (a jitted in-place
update: the state is donated) and draws its first token; `generate` runs `steps_per_call` token steps for every slot
inside one `lax.while_loop`; `Engine.run`, the host loop, keeps the slots busy: after every `generate` it hands the
rows that stopped (EOS, a stop sequence, `max_new_tokens`) to the caller, pulls the next requests, prefills them and
inserts them into the freed slots, so no slot waits for the slowest row of a batch.

Decode state (`Engine.init_state`), every array sharded on the mesh by its logical axes (rows over the data-parallel
axes, key/value heads over `tensor`, as static decoding):
  cache     the model's KV cache in slot form (`models.common`, "Slot cache"): per layer a tuple of tiers
            [b_t, g, s_t, d] of keys / values, positions and segment ids [b_t, s_t], `index` [B] (every slot writes at
            its own column) and the model's `valid_count` [B] (positions continue per slot)
  token [B] (the last token, fed to the next step), length [B] (new tokens so far), done [B], live [B] (the slot
  holds a row), columns [B] (cache columns used), keys [B, 2] (the row's sampling key), out [B, max_new_tokens]

**What a step reads.** Dense attention reads, for every slot, its tier's whole cache length: on XLA's CPU, GPU and
TPU backends the score and value contractions of a decode step have static shapes, so a slot cannot read only its
own live range (that needs a ragged / paged attention kernel, e.g. Pallas's ragged paged attention on TPU or a
FlashDecoding-style kernel on GPU, which this engine does not use). What the engine does instead, on every
backend, to keep the columns read close to the live ones:
  - windows: each tier's cache is only as long as its longest row needs for the next call (`window_bucket`: the
    columns in use + `steps_per_call`, rounded up to two sizes per power of two, or the tier's nominal length when
    that holds them), grown by padding when a row needs more and cut when every row fits in half; each window size
    compiles its own `generate` once.
  - tiers (`tiers`, optional): slot groups, each with its own window and a nominal length; new prompts go to the
    first tier with a free slot; a row about to pass its tier's nominal length moves up, into a free slot or by
    swapping with a row of the higher tier that still fits below (a copy of the shorter window's columns, once).
    With long-tailed outputs the few long rows then share one tier and the short rows' tier stays short; where no
    row can move, the lower tier's window grows (nothing pauses).
  - compaction: once every request has entered, the rows left move into a one-tier state of half the slots (or
    fewer, `decoding.batch_rows`) whenever they fit, so the last long rows of a run do not keep every slot
    computing; each smaller state compiles its own `generate`.

**Same outputs.** A row samples step t with `fold_in(row_key, t)`, `row_key = fold_in(PRNGKey(seed), stream)` (the
record's index), exactly as `decoding.generate`; sample k >= 1 of a prompt (`Request.samples`) uses
`fold_in(row_key, 2**31 + k)` instead (steps never reach 2**31, so the streams never meet). A row's attention
masks every column but its own, so its tokens depend on its prompt, the seed and its stream only, not on its slot,
its tier, or the step it entered at (up to float rounding of sums over padded lengths, as between static batches).

With several processes every process runs the same host loop on the same requests and reads the same (replicated)
step outputs, so all make the same decisions.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from typing import Any, Hashable, Iterable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from teacherlm_jax import decoding, partitioning
from teacherlm_jax.models import common, registry

SAMPLE_STREAM_OFFSET = 2 ** 31
TIERED = ("key", "value", "positions", "segment_ids")  # slot cache variables held per tier
SLOT_FIELDS = ("token", "length", "limit", "done", "live", "columns", "keys", "out")


@dataclasses.dataclass(frozen=True)
class Request:
  """A prompt to continue: `key` comes back with its outputs; `stream` keys its sampling (the record's index);
  `samples` continuations are drawn from one prefill; `max_new_tokens` lowers the engine's limit for this one."""

  key: Hashable
  ids: Sequence[int]
  stream: int
  samples: int = 1
  max_new_tokens: Optional[int] = None  # this request's limit (at most the engine's)


@dataclasses.dataclass(frozen=True)
class Finished:
  """One continuation: the request's key, the sample number, the generated ids (EOS or stop sequence included)."""

  key: Hashable
  sample: int
  ids: np.ndarray


@dataclasses.dataclass
class EngineStats:
  """Row-steps the engine computed and the tokens they kept (occupancy = kept / row_steps); cache columns the steps'
  attention read (every slot its tier's window) and the live ones among them (every active row up to its own
  column: what a ragged kernel would read); prefills, row moves between tiers, and compactions into fewer slots."""

  steps: int = 0
  row_steps: int = 0
  kept: int = 0
  columns_read: int = 0
  live_columns: int = 0
  prefills: int = 0
  prefilled_prompts: int = 0
  moves: int = 0
  compactions: int = 0

  @property
  def occupancy(self) -> float:
    return self.kept / max(self.row_steps, 1)


def long_tail_tiers(slots: int, prompt_length: int, max_new_tokens: int, row_multiple: int = 1
                    ) -> tuple[tuple[int, int], ...]:
  """Two tiers for long-tailed output lengths (sampling that stops at EOS after anywhere from a few to
  `max_new_tokens` tokens): 5/8 of the slots (a multiple of `row_multiple`) with a nominal length of the typical
  prompt_length + max_new_tokens // 4 columns, the rest above. One tier if there are too few slots."""
  if slots < 4 * row_multiple:
    return ((slots, prompt_length + max_new_tokens),)
  short = max(row_multiple, (slots * 5 // 8) // row_multiple * row_multiple)
  return ((short, prompt_length + max_new_tokens // 4), (slots - short, prompt_length + max_new_tokens))


def window_bucket(columns: int, limit: int, minimum: int = 64) -> int:
  """A tier's cache length for `columns` needed columns: rounded up to a multiple of half the largest power of two
  below it (at least `minimum`: 64, 128, 192, 256, 384, 512, 768, 1024, ...), at most `limit`."""
  octave = 1 << max((columns - 1).bit_length() - 1, 0)
  step = max(minimum, octave // 2)
  return min(max(minimum, -(-columns // step) * step), limit)


def row_keys(seed: int, streams: jax.Array, samples: jax.Array) -> jax.Array:
  """Key data [n, 2] of the sampling streams (stream, sample): see the module docstring."""
  base = jax.random.key(seed)

  def one(stream, sample):
    key = jax.random.fold_in(base, stream)
    other = jax.random.fold_in(key, sample.astype(jnp.uint32) + jnp.uint32(SAMPLE_STREAM_OFFSET))
    return jnp.where(sample > 0, jax.random.key_data(other), jax.random.key_data(key))
  return jax.vmap(one)(streams, samples)


def _stop_matched(out: jax.Array, length: jax.Array, stop_sequences) -> jax.Array:
  """[B] bool: whether each row's generated tokens out[b, :length[b]] end with a stop sequence."""
  matched = jnp.zeros(out.shape[:1], bool)
  for sequence in stop_sequences:
    m = len(sequence)
    columns = jnp.clip(length[:, None] - m + jnp.arange(m), 0, out.shape[1] - 1)
    window = jnp.take_along_axis(out, columns, axis=1)
    matched |= (length >= m) & jnp.all(window == jnp.asarray(sequence, out.dtype), axis=1)
  return matched


def _map_cache(fn, cache: dict, *others: dict) -> dict:
  """Applies fn(name, slot leaf, *other leaves) to every cache variable; a layer's tier tuples are single leaves."""
  def walk(node, *rest):
    return {name: (walk(value, *(r[name] for r in rest)) if isinstance(value, dict) else
                   fn(name, value, *(r[name] for r in rest))) for name, value in node.items()}
  return walk(dict(cache), *(dict(o) for o in others))


def _length_axis(array: jax.Array) -> int:
  """The column axis of a tier's array: keys / values [b, g, s, d], positions / segment ids [b, s]."""
  return 2 if array.ndim == 4 else 1


def _fit_columns(array: jax.Array, window: int) -> jax.Array:
  """A tier's array cut or zero-padded (segment id 0: never attended) to `window` columns."""
  axis = _length_axis(array)
  if window <= array.shape[axis]:
    return jax.lax.slice_in_dim(array, 0, window, axis=axis)
  return jnp.pad(array, [(0, window - array.shape[axis]) if i == axis else (0, 0) for i in range(array.ndim)])


def _tier(cache: dict, tier: int) -> dict:
  """One tier's arrays of every layer's slot cache (the other variables as empty leaves)."""
  return _map_cache(lambda name, leaf: leaf[tier] if name in TIERED else (), cache)


def _with_tier(cache: dict, tier: int, arrays: dict) -> dict:
  """`cache` with one tier's arrays replaced by `arrays` (as `_tier` gives them)."""
  return _map_cache(lambda name, leaf, new: leaf[:tier] + (new,) + leaf[tier + 1:] if name in TIERED else leaf,
                    cache, arrays)


class Engine:
  """B decode slots over one model (see the module docstring).

  Args:
    model, params: the teacher (run per layer: `decoding.per_layer`).
    config: decoding settings (`first_phase_tokens` / `phase_growth` do not apply: the windows grow instead).
    slots: B, the rows of every step (a multiple of the data-parallel mesh size).
    max_prompt_length: the longest prompt; prompts are left-padded to `decoding.bucket_length` buckets.
    tiers: (slots, nominal length in cache columns) per tier, shortest first (default: one tier; see
      `long_tail_tiers`). A tier's window may grow past its nominal length up to the full length.
    steps_per_call: token steps per `generate` call (rows that stop mid-call wait for its end to be replaced).
    seed: the run's sampling seed; mesh / rules: where the state lives (None = the default device).
  """

  def __init__(self, model: nn.Module, params: Any, config: decoding.DecodingConfig, *, slots: int,
               max_prompt_length: int, tiers: Optional[Sequence[tuple[int, int]]] = None,
               steps_per_call: int = 16, seed: int = 0, mesh: Optional[Mesh] = None,
               rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES):
    self.model, self.params = decoding.per_layer(model, params)
    self.config, self.seed, self.mesh, self.rules = config, seed, mesh, rules
    self.row_multiple = partitioning.data_parallel_size(mesh) if mesh is not None else 1
    self.max_prompt_length = decoding.bucket_length(max_prompt_length, max_prompt_length)
    self.full_length = self.max_prompt_length + max(config.max_new_tokens - 1, 1)  # the last token is not fed back
    self.tiers = tuple(tuple(t) for t in (tiers or ((slots, self.full_length),)))
    self._check(slots)
    self.slots, self.steps_per_call = slots, steps_per_call
    self.offsets = np.cumsum([0] + [n for n, _ in self.tiers])
    self.tier_of = np.concatenate([np.full(n, t, np.int32) for t, (n, _) in enumerate(self.tiers)])
    self.stats = EngineStats()
    self._jits: dict = {}

  def _check(self, slots: int) -> None:
    if sum(n for n, _ in self.tiers) != slots:
      raise ValueError(f"tiers {self.tiers} hold {sum(n for n, _ in self.tiers)} slots, not the engine's {slots}")
    for n, length in self.tiers:
      if n < 1 or n % self.row_multiple:
        raise ValueError(f"tier of {n} slots in {self.tiers}: every tier needs a positive multiple of the "
                         f"data-parallel mesh size {self.row_multiple} slots; change slots or tiers")
      if length < 1:
        raise ValueError(f"tier length {length} in {self.tiers} must be positive")
    if [length for _, length in self.tiers] != sorted(length for _, length in self.tiers):
      raise ValueError(f"tiers {self.tiers} must be ordered by length, shortest first")

  # ------------------------------------------------------------------------------------------- shardings

  def _sharding(self, axes) -> Optional[NamedSharding]:
    if self.mesh is None:
      return None
    return NamedSharding(self.mesh, nn.logical_to_mesh_axes(axes, self.rules))

  def _state_axes(self, state: dict) -> dict:
    def cache_axes(name, leaf):
      axes = ("batch",) if name == "index" else common.CACHE_LOGICAL_AXES[name]
      return tuple(axes for _ in leaf) if isinstance(leaf, tuple) else axes
    slot_axes = {"token": ("batch",), "length": ("batch",), "limit": ("batch",), "done": ("batch",),
                 "live": ("batch",),
                 "columns": ("batch",), "keys": ("batch", None), "out": ("batch", None)}
    return {"cache": _map_cache(cache_axes, state["cache"]), **slot_axes}

  def _state_shardings(self, state: dict) -> Any:
    if self.mesh is None:
      return None
    return jax.tree.map(self._sharding, self._state_axes(state), is_leaf=lambda x: isinstance(x, tuple) and (
        not x or not isinstance(x[0], tuple)))

  def _tier_shardings(self, arrays: dict) -> Any:
    return _map_cache(lambda name, leaf: self._sharding(common.CACHE_LOGICAL_AXES[name]) if name in TIERED else (),
                      arrays)

  def _replicated(self):
    return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

  def _params_shardings(self):
    if self.mesh is None:
      return None
    return partitioning.logical_shardings(
        partitioning.abstract_params(functools.partial(common.init_params, self.model), jax.random.key(0)),
        self.mesh, self.rules)

  def _host(self, arrays, axes):
    """Host arrays as global arrays on the mesh (every process passes the same whole arrays)."""
    if self.mesh is None:
      return arrays
    return partitioning.shard_host_arrays(arrays, tuple(self._sharding(a) for a in axes))

  def _to_numpy(self, tree):
    if self.mesh is None:
      return jax.tree.map(np.asarray, tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)

  # ------------------------------------------------------------------------------------------- device steps

  def _empty_state(self, windows: tuple[int, ...]) -> dict:
    """The state's arrays (under jit): an empty slot cache with these tier windows, and idle slots."""
    layer_cache = common.init_cache(self.model, 1, 1)
    b = self.slots
    sizes = [(n, w) for (n, _), w in zip(self.tiers, windows)]

    def slot_leaf(name, leaf):
      if name in ("key", "value"):
        return tuple(jnp.zeros((n, leaf.shape[1], w, leaf.shape[3]), leaf.dtype) for n, w in sizes)
      if name in ("positions", "segment_ids"):
        return tuple(jnp.zeros((n, w), leaf.dtype) for n, w in sizes)
      return jnp.zeros((b,), jnp.int32)  # index, valid_count
    state = {"cache": _map_cache(slot_leaf, layer_cache), "token": jnp.zeros((b,), jnp.int32),
             "length": jnp.zeros((b,), jnp.int32), "limit": jnp.zeros((b,), jnp.int32),
             "done": jnp.ones((b,), bool), "live": jnp.zeros((b,), bool),
             "columns": jnp.zeros((b,), jnp.int32), "keys": jnp.zeros((b, 2), jnp.uint32),
             "out": jnp.full((b, self.config.max_new_tokens), self.config.pad_id, jnp.int32)}
    return state

  def init_state(self, windows: Optional[Sequence[int]] = None) -> dict:
    """A decode state with every slot free, on the mesh (tier windows: the smallest bucket by default)."""
    windows = tuple(windows or [window_bucket(1, self.full_length)] * len(self.tiers))
    fn = functools.partial(self._empty_state, windows)
    with self._context():
      return jax.jit(fn, out_shardings=self._state_shardings(jax.eval_shape(fn)))()

  def _resize(self, arrays, *, window: int):
    """One tier's cache arrays (`_tier`) padded or cut to `window` columns (cut columns must be unused)."""
    return _map_cache(lambda name, array: _fit_columns(array, window) if name in TIERED else array, arrays)

  def _context(self):
    return partitioning.activation_rules(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

  def _prefill(self, params, tokens, mask):
    """(a fresh KV cache of the prompts [P, L], their last logits [P, v] float32)."""
    cache = decoding.constrain_cache(common.init_cache(self.model, tokens.shape[0], tokens.shape[1]))
    logits, state = self.model.apply({"params": params, "cache": cache}, tokens, mask, decode=True,
                                     last_only=True, mutable=["cache"])
    return state["cache"], logits[:, -1].astype(jnp.float32)

  def _first_tokens(self, logits, keys):
    """The first token of each (prompt, stream) from the prefill's logits [n, v] and key data [n, 2]."""
    step_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), 0))(keys)
    return decoding.next_tokens(logits, step_keys, self.config)

  def _insert(self, state, prefilled, logits, prompt, slot, stream, sample, limit, *, tier: int):
    """Copies prefilled prompt `prompt` into `slot` (a slot of tier `tier`) and draws its first token."""
    row = slot - self.offsets[tier]

    def copy(name, slot_leaf, pre_leaf):
      if name in TIERED:
        update = jax.lax.dynamic_slice_in_dim(pre_leaf, prompt, 1, axis=0)
        tiers = list(slot_leaf)
        start = (row,) + (0,) * (update.ndim - 1)
        tiers[tier] = jax.lax.dynamic_update_slice(tiers[tier], update.astype(tiers[tier].dtype), start)
        return tuple(tiers)
      if name == "index":
        return slot_leaf.at[slot].set(pre_leaf)
      return slot_leaf.at[slot].set(pre_leaf[prompt])  # valid_count
    cache = _map_cache(copy, state["cache"], prefilled)
    key = row_keys(self.seed, stream[None], sample[None])
    token = self._first_tokens(jax.lax.dynamic_slice_in_dim(logits, prompt, 1, axis=0), key)[0]
    out = jnp.full((self.config.max_new_tokens,), self.config.pad_id, jnp.int32).at[0].set(token)
    done = ((token == self.config.eos_id) | _stop_matched(out[None], jnp.ones((1,), jnp.int32),
                                                          self.config.stop_sequences)[0]
            | (limit <= 1))
    prompt_columns = _first_variable(prefilled, "index")  # the columns the prefill used
    return {"cache": cache, "token": state["token"].at[slot].set(token),
            "length": state["length"].at[slot].set(1), "limit": state["limit"].at[slot].set(limit),
            "done": state["done"].at[slot].set(done),
            "live": state["live"].at[slot].set(True), "columns": state["columns"].at[slot].set(prompt_columns),
            "keys": state["keys"].at[slot].set(key[0]), "out": state["out"].at[slot].set(out)}

  def _rows(self, state, a, b, *, tiers: tuple[int, int]):
    """The cache rows of slots a (tier tiers[0]) and b (tier tiers[1]), their first min(window) columns."""
    ta, tb = tiers
    ra, rb = a - self.offsets[ta], b - self.offsets[tb]

    def rows(name, leaf):
      if name not in TIERED:
        return leaf[jnp.stack([a, b])]
      width = min(leaf[ta].shape[_length_axis(leaf[ta])], leaf[tb].shape[_length_axis(leaf[tb])])
      return tuple(_fit_columns(jax.lax.dynamic_slice_in_dim(leaf[t], r, 1, axis=0), width)
                   for t, r in ((ta, ra), (tb, rb)))
    return _map_cache(rows, state["cache"])

  def _swap(self, state, rows, a, b, *, tiers: tuple[int, int]):
    """Writes the rows `_rows` read from slots a and b back crosswise, and swaps every per-slot value. Both rows
    must fit in the shorter tier (the host checks). Rows are read by a separate call: a program that reads one tier
    while writing the other makes XLA copy both tiers whole."""
    ta, tb = tiers
    ra, rb = a - self.offsets[ta], b - self.offsets[tb]

    def swap(name, leaf, read):
      if name not in TIERED:
        return leaf.at[a].set(read[1]).at[b].set(read[0])
      arrays = list(leaf)
      start = lambda r: (r,) + (0,) * (arrays[0].ndim - 1)
      arrays[ta] = jax.lax.dynamic_update_slice(arrays[ta], read[1], start(ra))
      arrays[tb] = jax.lax.dynamic_update_slice(arrays[tb], read[0], start(rb))
      return tuple(arrays)
    swapped = {"cache": _map_cache(swap, state["cache"], rows)}
    for name in SLOT_FIELDS:
      swapped[name] = state[name].at[a].set(state[name][b]).at[b].set(state[name][a])
    return swapped

  def _compact(self, state, sources, live, *, tiers: tuple[int, ...], window: int):
    """A one-tier state of len(sources) slots, slot i holding the row of slot sources[i] (the state's tiers are
    `tiers` slots long), its cache cut or padded to `window` columns; slots where `live` is False are idle."""
    offsets = np.cumsum((0,) + tiers)
    tier = jnp.searchsorted(jnp.asarray(offsets[1:]), sources, side="right")

    def gather(name, leaf):
      if name not in TIERED:
        return leaf[sources]
      picked = None
      for t, array in enumerate(leaf):
        rows = jnp.clip(sources - offsets[t], 0, array.shape[0] - 1)
        taken = _fit_columns(array[rows], window)
        match = (tier == t).reshape((-1,) + (1,) * (taken.ndim - 1))
        picked = taken if picked is None else jnp.where(match, taken, picked)
      return (picked,)
    compacted = {"cache": _map_cache(gather, state["cache"])}
    for name in SLOT_FIELDS:
      compacted[name] = state[name][sources]
    compacted["live"] = compacted["live"] & live
    compacted["done"] = compacted["done"] | ~live
    return compacted

  def _generate(self, params, state):
    """Up to `steps_per_call` steps of every slot; returns (state, host view)."""
    config, capacity = self.config, jnp.asarray(_capacity(state["cache"]))
    head_kernel = registry.head_kernel(self.model.config, params)
    rows = jnp.arange(state["token"].shape[0])

    def cond(carry):
      step, state, _, _ = carry
      return (step < self.steps_per_call) & jnp.any(state["live"] & ~state["done"] & (state["columns"] < capacity))

    def body(carry):
      step, state, kept, live = carry
      active = state["live"] & ~state["done"] & (state["columns"] < capacity)
      live = live + jnp.sum(jnp.where(active, state["columns"] + 1, 0))
      hidden, new = self.model.apply({"params": params, "cache": state["cache"]}, state["token"][:, None],
                                     active[:, None].astype(jnp.int32), decode=True, hidden_only=True,
                                     mutable=["cache"])
      logits = common.lm_head(self.model.config, hidden, head_kernel)[:, -1].astype(jnp.float32)
      keys = jax.vmap(lambda k, t: jax.random.fold_in(jax.random.wrap_key_data(k), t))(state["keys"],
                                                                                         state["length"])
      token = jnp.where(active, decoding.next_tokens(logits, keys, config), state["token"])
      column = jnp.minimum(state["length"], config.max_new_tokens - 1)
      out = state["out"].at[rows, column].set(jnp.where(active, token, state["out"][rows, column]))
      length = state["length"] + active
      stopped = (token == config.eos_id) | _stop_matched(out, length, config.stop_sequences)
      done = state["done"] | (active & (stopped | (length >= state["limit"])))
      state = {"cache": new["cache"], "token": token, "length": length, "limit": state["limit"], "done": done,
               "live": state["live"],
               "columns": state["columns"] + active, "keys": state["keys"], "out": out}
      return step + 1, state, kept + jnp.sum(active), live

    zero = jnp.zeros((), jnp.int32)
    steps, state, kept, live = jax.lax.while_loop(cond, body, (zero, state, zero, zero))
    view = {"steps": steps, "kept": kept, "live_columns": live, "out": state["out"], "length": state["length"],
            "done": state["done"], "columns": state["columns"]}
    return state, view

  def _call(self, name: str, fn, *args, **static):
    """Runs step `name` jitted (compiled once per static arguments and argument shapes), the decode state donated,
    the state's outputs sharded by their logical axes and host views replicated."""
    shapes = tuple(getattr(x, "shape", None) for x in jax.tree.leaves(args[1:] if name in ("prefill", "generate")
                                                                    else args))  # not the params
    key = (name, shapes) + tuple(sorted(static.items()))
    if key not in self._jits:
      fn = functools.partial(fn, **static)
      # not donated: prefill and rows (the state lives on), resize and compact (new shapes)
      donate = {"prefill": (), "rows": (), "resize": (), "compact": (), "generate": (1,)}.get(name, (0,))
      if self.mesh is None or name == "rows":
        jitted = jax.jit(fn, donate_argnums=donate)
      elif name == "prefill":
        jitted = jax.jit(fn, in_shardings=(self._params_shardings(), None, None))
      else:
        out = jax.eval_shape(fn, *args)
        outs = ((self._state_shardings(out[0]), self._replicated()) if name == "generate"
                else self._tier_shardings(out) if name == "resize" else self._state_shardings(out))
        jitted = jax.jit(fn, donate_argnums=donate, out_shardings=outs)
      self._jits[key] = jitted
    with self._context():
      return self._jits[key](*args)

  # ------------------------------------------------------------------------------------------- host loop

  def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[Any, Any, int]:
    """Prefills prompts in one left-padded bucket (padded to a power-of-two row count with copies of the first):
    (cache, last logits, padded length)."""
    length = decoding.bucket_length(max(len(p) for p in prompts), self.max_prompt_length)
    rows = decoding.batch_rows(len(prompts), self.slots, self.row_multiple)
    rows = max(rows, len(prompts))
    tokens, mask = decoding.left_pad(list(prompts) + [prompts[0]] * (rows - len(prompts)), length)
    tokens, mask = self._host((tokens, mask), [("batch", "length")] * 2)
    cache, logits = self._call("prefill", self._prefill, self.params, tokens, mask)
    self.stats.prefills += 1
    self.stats.prefilled_prompts += len(prompts)
    return cache, logits, length

  def insert(self, state, prefilled, logits, prompt: int, slot: int, stream: int, sample: int,
             max_new_tokens: Optional[int] = None):
    """`state` with prefilled prompt `prompt` in `slot` (a free slot), streaming (stream, sample)."""
    limit = min(max_new_tokens or self.config.max_new_tokens, self.config.max_new_tokens)
    scalars = self._host(tuple(np.asarray(v, np.int32) for v in (prompt, slot, stream, sample, limit)), [()] * 5)
    return self._call("insert", self._insert, state, prefilled, logits, *scalars, tier=int(self.tier_of[slot]))

  def swap(self, state, a: int, b: int):
    """`state` with the rows of slots a and b exchanged."""
    self.stats.moves += 1
    scalars = self._host((np.asarray(a, np.int32), np.asarray(b, np.int32)), [(), ()])
    tiers = (int(self.tier_of[a]), int(self.tier_of[b]))
    rows = self._call("rows", self._rows, state, *scalars, tiers=tiers)
    return self._call("swap", self._swap, state, rows, *scalars, tiers=tiers)

  def resize(self, state, windows: Sequence[int]):
    """`state` with these tier windows (cache lengths). Only the tiers that change are copied."""
    cache = state["cache"]
    for tier, (old, new) in enumerate(zip(windows_of(state), windows)):
      if old != new:
        arrays = self._call("resize", self._resize, _tier(cache, tier), window=int(new))
        cache = _with_tier(cache, tier, arrays)
    return {**state, "cache": cache}

  def compact(self, state, keep: Sequence[int], window: int):
    """A smaller one-tier state holding the rows of slots `keep` (in that order, then idle slots up to
    `decoding.batch_rows`), its window `window` columns: for the end of a run, when no request is left to insert
    and most slots are idle (fewer rows, fewer row-steps). Inserts and swaps assume the engine's own tiers, so they
    do not apply to a compacted state."""
    slots = decoding.batch_rows(len(keep), len(state["token"]), self.row_multiple)
    sources = np.asarray(list(keep) + [keep[0]] * (slots - len(keep)), np.int32)
    live = np.arange(slots) < len(keep)
    arrays = self._host((sources, live), [("batch",), ("batch",)])
    self.stats.compactions += 1
    return self._call("compact", self._compact, state, *arrays, tiers=_tier_rows(state), window=int(window))

  def generate(self, state):
    """(state, numpy view) after one `generate` call of up to `steps_per_call` steps."""
    state, view = self._call("generate", self._generate, self.params, state)
    view = self._to_numpy(view)
    self.stats.steps += int(view["steps"])
    self.stats.row_steps += int(view["steps"]) * len(view["done"])
    self.stats.kept += int(view["kept"])
    self.stats.live_columns += int(view["live_columns"])
    self.stats.columns_read += int(view["steps"]) * int(_capacity(state["cache"]).sum())
    return state, view

  def run(self, requests: Iterable[Request]) -> Iterator[Finished]:
    """Continues every request (each `samples` times), yielding continuations as they finish (any order)."""
    loop = _HostLoop(self, iter(requests))
    yield from loop.run()


def _first_variable(cache: dict, name: str) -> Any:
  """The first layer's cache variable `name` (every layer's has the same shapes, and the same `index`)."""
  for key, value in cache.items():
    if isinstance(value, dict):
      found = _first_variable(value, name)
      if found is not None:
        return found
    elif key == name:
      return value
  return None


def _tier_rows(state: dict) -> tuple[int, ...]:
  """The slots of each tier of a decode state."""
  return tuple(int(array.shape[0]) for array in _first_variable(state["cache"], "segment_ids"))


def windows_of(state: dict) -> tuple[int, ...]:
  """The cache length of every tier of a decode state."""
  return tuple(int(array.shape[2]) for array in _first_variable(state["cache"], "key"))


def _capacity(cache: dict) -> np.ndarray:
  """[B] the cache columns of every slot's tier (static: from the shapes)."""
  return np.concatenate([np.full(a.shape[0], a.shape[2], np.int32) for a in _first_variable(cache, "key")])


class _HostLoop:
  """The host side of `Engine.run`: which row is in which slot, what waits to be inserted, when rows move up, and
  how long each tier's window is."""

  def __init__(self, engine: Engine, requests: Iterator[Request]):
    self.engine, self.requests, self.exhausted = engine, requests, False
    self.rows: list[Optional[tuple[Request, int]]] = [None] * engine.slots  # (request, sample) per slot
    self.columns = np.zeros(engine.slots, np.int64)
    self.pending: collections.deque = collections.deque()  # (prefill handle, prompt row, request, sample)
    self.windows: list[int] = []
    self.tiers = list(engine.tiers)  # (slots, nominal length): the engine's, one tier once compacted

  def tier_slots(self, tier: int) -> range:
    start = sum(n for n, _ in self.tiers[:tier])
    return range(start, start + self.tiers[tier][0])

  def pull(self, wanted: int) -> None:
    """Prefills enough new requests for `wanted` more samples, in one bucket filled with real requests: a bucket
    computes a power of two of rows (`decoding.batch_rows`), and the requests beyond `wanted` wait in `pending`."""
    batch, rows = [], 0
    while (wanted > 0 or len(batch) < rows) and not self.exhausted:
      request = next(self.requests, None)
      if request is None:
        self.exhausted = True
        break
      if request.samples < 1:
        raise ValueError(f"request {request.key!r} asks for {request.samples} samples")
      batch.append(request)
      wanted -= request.samples
      rows = decoding.batch_rows(len(batch), self.engine.slots, self.engine.row_multiple)
    if batch:
      handle = self.engine.prefill([r.ids for r in batch])
      for p, request in enumerate(batch):
        for k in range(request.samples):
          self.pending.append((handle, p, request, k))

  def resize(self, state, tier: int, window: int):
    windows = list(self.windows)
    windows[tier] = window
    if windows != self.windows:
      state = self.engine.resize(state, windows)
      self.windows = windows
    return state

  def grow(self, state, tier: int, columns: int):
    """Grows the tier's window to hold `columns` columns, if it is shorter."""
    if columns > self.windows[tier]:
      state = self.resize(state, tier, window_bucket(columns, self.engine.full_length))
    return state

  def fill(self, state):
    """Inserts waiting samples (pulling and prefilling new requests) into the free slots, first tier first."""
    free = [s for s, row in enumerate(self.rows) if row is None]
    if len(free) > len(self.pending):
      self.pull(len(free) - len(self.pending))
    for slot in free:
      if not self.pending:
        break
      (cache, logits, length), p, request, k = self.pending.popleft()
      state = self.grow(state, int(self.engine.tier_of[slot]), length + self.engine.steps_per_call)
      state = self.engine.insert(state, cache, logits, p, slot, request.stream, k, request.max_new_tokens)
      self.rows[slot], self.columns[slot] = (request, k), length
    return state

  def promote(self, state):
    """Moves rows that would pass their tier's nominal length within the next call up one tier: into a free slot,
    or swapping with the shortest row there that still fits in the lower window."""
    engine, n = self.engine, self.engine.steps_per_call
    for tier in range(len(self.tiers) - 1):
      nominal = self.tiers[tier][1]
      upper = self.tier_slots(tier + 1)
      for slot in self.tier_slots(tier):
        if self.rows[slot] is None or self.columns[slot] + n <= nominal:
          continue
        fits = [s for s in upper if self.rows[s] is None or self.columns[s] + n <= nominal]
        if not fits:
          continue
        target = min(fits, key=lambda s: (self.rows[s] is not None, self.columns[s], s))
        state = self.grow(state, tier + 1, int(self.columns[slot]) + n)  # both windows hold both rows
        if self.rows[target] is not None:
          state = self.grow(state, tier, int(self.columns[target]) + n)
        state = engine.swap(state, slot, target)
        self.rows[slot], self.rows[target] = self.rows[target], self.rows[slot]
        self.columns[slot], self.columns[target] = self.columns[target], self.columns[slot]
    return state

  def fit_windows(self, state):
    """Every tier's window grown to its longest row + one call, or cut to half or less when that fits; a tier whose
    rows fit in its nominal length gets at most that length."""
    for tier in range(len(self.tiers)):
      used = [int(self.columns[s]) for s in self.tier_slots(tier) if self.rows[s] is not None]
      needed = max(used, default=1) + self.engine.steps_per_call
      want = window_bucket(needed, self.engine.full_length)
      nominal = self.tiers[tier][1]
      back = needed <= nominal < self.windows[tier]  # rows that made it grow past its nominal length have left
      if needed <= nominal:
        want = min(want, nominal)
      if want > self.windows[tier] or want <= self.windows[tier] // 2 or back:
        state = self.resize(state, tier, want)
    return state

  def compact(self, state):
    """Once no request is left to insert, moves the rows into a one-tier state of half the slots or fewer when
    they fit (`Engine.compact`): the last long rows do not keep every slot computing."""
    keep = [s for s, row in enumerate(self.rows) if row is not None]
    if not self.exhausted or self.pending or not keep:
      return state
    slots = decoding.batch_rows(len(keep), len(self.rows), self.engine.row_multiple)
    if slots > len(self.rows) // 2:
      return state
    window = window_bucket(int(self.columns[keep].max()) + self.engine.steps_per_call, self.engine.full_length)
    state = self.engine.compact(state, keep, window)
    self.rows = [self.rows[s] for s in keep] + [None] * (slots - len(keep))
    self.columns = np.concatenate([self.columns[keep], np.zeros(slots - len(keep), np.int64)])
    self.tiers, self.windows = [(slots, self.engine.full_length)], [window]
    return state

  def run(self) -> Iterator[Finished]:
    engine = self.engine
    state = engine.init_state()
    self.windows = list(windows_of(state))
    while True:
      state = self.fill(state)
      if all(row is None for row in self.rows):
        return
      state = self.fit_windows(self.promote(self.compact(state)))
      state, view = engine.generate(state)
      self.columns[:] = view["columns"]
      for slot in np.flatnonzero(view["done"]):
        if self.rows[slot] is None:
          continue
        request, k = self.rows[slot]
        self.rows[slot] = None
        yield Finished(request.key, k, view["out"][slot, :int(view["length"][slot])].copy())
