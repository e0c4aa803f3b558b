"""Batched autoregressive decoding inside jit: one prefill pass over the prompts, then `lax.while_loop`s of token steps
over the KV cache, stopping as soon as every row has produced EOS or `max_new_tokens`. The loop runs layer by layer
(per-layer params and cache, even for a model trained with `nn.scan`) and in phases whose cache grows with them
(`DecodingConfig.first_phase_tokens`, `phase_growth`), so a step attends over little more than the tokens so far.

Prompts are left-padded ([batch, prompt_length] with a mask), so every row's next token is read at the same column.
Greedy decoding (temperature 0) or sampling with temperature, top-k and top-p. Every row samples with its own key,
`fold_in(fold_in(PRNGKey(seed), row_seed), step)`, so with a fixed seed a record's output does not depend on which
batch, or which position in it, the record landed in.

A row stops at EOS or when its last tokens equal one of `stop_sequences` (token ids of stop strings; the caller
also cuts the decoded text at the first stop string, see `cut_at_stop_strings`, since a string can be tokenized in
more than one way). On a mesh (`jit_generate(..., mesh=...)`, called inside `partitioning.activation_rules`) the
prompts and the KV cache are sharded by the logical axis rules: rows over the data-parallel axes, key/value heads
over `tensor` (`kv_heads`); the outputs come back replicated.

`plan_batches` groups prompts of similar length (sorted by length, each batch padded to a bucket length) so that
little compute goes to padding and only a few prompt shapes are compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from teacherlm_jax import partitioning
from teacherlm_jax.models import common, registry


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
  """How to pick tokens.

  Attributes:
    max_new_tokens: the most tokens generated per row.
    eos_id: stops a row (the EOS token is kept in the output).
    temperature: 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: sample among the k most likely tokens (0 = all).
    top_p: sample among the smallest set of tokens whose probability reaches p (1.0 = all).
    pad_id: written after a row has stopped.
    stop_sequences: token-id sequences that stop a row once its last generated tokens equal one (kept in the
      output, like EOS).
    first_phase_tokens: the decoding loop runs in phases whose KV cache grows with them: the first phase's cache
      holds the prompt and this many new tokens, each later phase's `phase_growth` times as many (up to
      `max_new_tokens`), so early steps attend over a short cache and rows that all stop early never touch a long
      one. Every phase compiles its own loop; 0 = one phase over the whole cache.
    phase_growth: how much each phase's new tokens grow over the previous phase's (> 1). With 256 new tokens after
      a 112-token prompt, 1.5 reads 7% less cache than doubling, for two more loops to compile.
  """

  max_new_tokens: int = 64
  eos_id: int = 2
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  pad_id: int = 0
  stop_sequences: tuple[tuple[int, ...], ...] = ()
  first_phase_tokens: int = 64
  phase_growth: float = 1.5

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
    if self.first_phase_tokens < 0:
      raise ValueError(f"first_phase_tokens must be >= 0 (0 = one phase), got {self.first_phase_tokens}")
    if not self.phase_growth > 1:
      raise ValueError(f"phase_growth must be > 1, got {self.phase_growth}")
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f"invalid sampling settings: temperature {self.temperature} (>= 0), top_k {self.top_k} "
                       f"(>= 0), top_p {self.top_p} (in (0, 1])")
    object.__setattr__(self, "stop_sequences", tuple(tuple(int(t) for t in s) for s in self.stop_sequences if s))


def filter_logits(logits: jax.Array, config: DecodingConfig) -> jax.Array:
  """Temperature, top-k and top-p applied to float32 logits [b, v]; excluded tokens get -inf."""
  logits = logits / config.temperature
  if config.top_k:
    kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if config.top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
    # The smallest logit still needed to reach top_p (the first token is always kept).
    cutoff_index = jnp.sum(cumulative - jax.nn.softmax(ordered, axis=-1) < config.top_p, axis=-1) - 1
    cutoff = jnp.take_along_axis(ordered, cutoff_index[:, None], axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def first_max_index(x: jax.Array) -> jax.Array:
  """`argmax` over the last axis ([b, v] -> [b] int32, the first index of the largest value), computed with two
  plain reductions: XLA's CPU backend vectorizes those, not the variadic reduce of `jnp.argmax` (3x slower here)."""
  size = x.shape[-1]
  hit = x == jnp.max(x, axis=-1, keepdims=True)
  return jnp.minimum(jnp.min(jnp.where(hit, jnp.arange(size, dtype=jnp.int32), size), axis=-1), size - 1)


def _last_positive(x: jax.Array) -> jax.Array:
  """[b, n] -> [b]: the last index where x > 0 (0 if none)."""
  return jnp.max(jnp.where(x > 0, jnp.arange(x.shape[-1], dtype=jnp.int32), 0), axis=-1)


def sample_categorical(uniform: jax.Array, logits: jax.Array, block: int = 128) -> jax.Array:
  """One token per row drawn from softmax(logits), by inverting the cumulative distribution at `uniform`.

  One uniform number per row (instead of `jax.random.categorical`'s Gumbel noise over the whole vocabulary) and a
  two-level search: the block of `block` tokens whose cumulative mass passes u * total, then the token inside it.
  Tokens of probability 0 (logit -inf) are never drawn.

  Args:
    uniform: [b] float32 in [0, 1); logits: [b, v] float32 (-inf for excluded tokens).

  Returns:
    [b] int32 token ids.
  """
  batch, size = logits.shape
  num_blocks = -(-size // block)
  probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  probs = jnp.pad(probs, ((0, 0), (0, num_blocks * block - size))).reshape(batch, num_blocks, block)
  block_mass = probs.sum(axis=-1)  # [b, blocks]
  block_end = jnp.cumsum(block_mass, axis=-1)
  target = uniform * block_end[:, -1]
  chosen = jnp.minimum(jnp.sum(block_end <= target[:, None], axis=-1), _last_positive(block_mass))  # rounding
  take = lambda x: jnp.take_along_axis(x, chosen[:, None], axis=1)[:, 0]
  within = target - (take(block_end) - take(block_mass))
  inside = jnp.take_along_axis(probs, chosen[:, None, None], axis=1)[:, 0]  # [b, block]
  index = jnp.minimum(jnp.sum(jnp.cumsum(inside, axis=-1) <= within[:, None], axis=-1), _last_positive(inside))
  return (chosen * block + index).astype(jnp.int32)


def next_tokens(logits: jax.Array, keys: jax.Array, config: DecodingConfig) -> jax.Array:
  """The next token of every row [b] from its logits [b, v] (float32) and its key [b]."""
  if config.temperature == 0.0:
    return first_max_index(logits)
  uniform = jax.vmap(lambda key: jax.random.uniform(key, dtype=jnp.float32))(keys)
  return sample_categorical(uniform, filter_logits(logits, config))


def stop_sequence_matched(tokens: jax.Array, step: jax.Array, stop_sequences: Sequence[Sequence[int]]) -> jax.Array:
  """[b] bool: whether the tokens generated up to and including column `step` of tokens [b, n] end with a stop
  sequence."""
  matched = jnp.zeros(tokens.shape[:1], bool)
  for sequence in stop_sequences:
    length = len(sequence)
    if length > tokens.shape[1]:
      continue
    start = step - length + 1
    window = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(start, 0), length, axis=1)
    matched |= (start >= 0) & jnp.all(window == jnp.asarray(sequence, tokens.dtype), axis=1)
  return matched


CACHE_LOGICAL_AXES = common.CACHE_LOGICAL_AXES


def cache_logical_axes(cache) -> dict:
  """Logical axis names of every cache variable (a leading `layers` axis for scanned layers)."""
  def axes(path, leaf):
    names = CACHE_LOGICAL_AXES[path[-1].key]
    return ("layers",) * (leaf.ndim - len(names)) + names
  return jax.tree_util.tree_map_with_path(axes, cache)


def constrain_cache(cache) -> dict:
  """Sharding constraints on the cache by the logical axis rules in effect (a no-op outside a mesh context)."""
  return jax.tree.map(nn.with_logical_constraint, cache, cache_logical_axes(cache),
                      is_leaf=lambda x: isinstance(x, jax.Array))


def phase_ends(config: DecodingConfig) -> list[int]:
  """The new-token counts at which the decoding phases end (see `DecodingConfig.first_phase_tokens`), e.g.
  [64, 96, 144, 216, 300] for 300 new tokens (each end is `phase_growth` times the previous, rounded up)."""
  end = config.first_phase_tokens or config.max_new_tokens
  ends = [min(end, config.max_new_tokens)]
  while ends[-1] < config.max_new_tokens:
    ends.append(min(math.ceil(config.phase_growth * ends[-1]), config.max_new_tokens))
  return ends


def grow_cache(cache, length: int) -> dict:
  """The cache with its length axis padded to `length` slots; the new slots are empty (segment 0: never attended)."""
  def grow(leaf, axes):
    if "length" not in axes:
      return leaf
    axis = axes.index("length")
    return jnp.pad(leaf, [(0, length - leaf.shape[axis]) if i == axis else (0, 0) for i in range(leaf.ndim)])
  return constrain_cache(jax.tree.map(grow, cache, cache_logical_axes(cache)))


def per_layer(model: nn.Module, params) -> tuple[nn.Module, dict]:
  """The model and params with one module (and one cache) per layer: a scanned model's stacked params are sliced.

  Decoding steps run faster this way: every layer's cache is its own loop variable, updated in place, where
  `nn.scan` would slice and re-stack the stacked cache at every step. Compile time grows with the layer count.
  The slices are a second copy of the layer params for the length of the call: for a large model load them per
  layer instead (`convert.load_model(..., scan_layers=False)`, as the annotation loop does), and this is a no-op.
  """
  if not model.config.scan_layers:
    return model, params
  config = dataclasses.replace(model.config, scan_layers=False)
  return registry.build(config), registry.relayout_layers(config, params, scan_layers=False)


def generate(model: nn.Module, params, prompt_tokens: jax.Array, prompt_mask: jax.Array, row_seeds: jax.Array,
             config: DecodingConfig, seed: int = 0, row_limits: Optional[jax.Array] = None
             ) -> tuple[jax.Array, jax.Array]:
  """Continues left-padded prompts.

  Args:
    model, params: the model (scanned or not: decoding runs it per layer, see `per_layer`).
    prompt_tokens: [b, l] int32, left-padded; prompt_mask: [b, l], 1 for prompt tokens.
    row_seeds: [b] int32, one per record (e.g. its index in the dataset): its sampling stream.
    config: decoding settings; seed: the run's sampling seed.
    row_limits: optional [b] int32, the most new tokens of each row (at most config.max_new_tokens).

  Returns:
    tokens [b, max_new_tokens] int32 (pad_id after a row's EOS) and lengths [b] (generated tokens, EOS included).
  """
  model, params = per_layer(model, params)
  batch, prompt_length = prompt_tokens.shape
  base = jax.random.key(seed)
  row_keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(row_seeds)

  def pick(step, logits, tokens, done, lengths):
    """Chooses column `step` of every row from its logits [b, v] and updates (tokens, done, lengths)."""
    keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(row_keys)
    token = jnp.where(done, config.pad_id, next_tokens(logits.astype(jnp.float32), keys, config))
    tokens = tokens.at[:, step].set(token)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | (token == config.eos_id) | stop_sequence_matched(tokens, step, config.stop_sequences)
    if row_limits is not None:
      done = done | (lengths >= row_limits)
    return token, tokens, done, lengths

  ends = phase_ends(config)
  cache = constrain_cache(common.init_cache(model, batch, prompt_length + ends[0]))
  logits, state = model.apply({"params": params, "cache": cache}, prompt_tokens, prompt_mask, decode=True,
                              last_only=True, mutable=["cache"])
  token, tokens, done, lengths = pick(
      0, logits[:, -1], jnp.full((batch, config.max_new_tokens), config.pad_id, jnp.int32),
      jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))

  def cond(carry, end):
    step, _, _, _, done, _ = carry
    return (step < end) & ~jnp.all(done)

  # The LM head's kernel [e, v] (a tied head's embeddings transposed once here: inside the loop the head then reads
  # it row-major).
  head_kernel = registry.head_kernel(model.config, params)

  def body(carry):
    """Runs the model on the last chosen token, then chooses column `step` (no model call after the last one)."""
    step, cache, token, tokens, done, lengths = carry
    hidden, new_state = model.apply({"params": params, "cache": cache}, token[:, None], decode=True,
                                    hidden_only=True, mutable=["cache"])
    step_logits = common.lm_head(model.config, hidden, head_kernel)
    token, tokens, done, lengths = pick(step, step_logits[:, -1], tokens, done, lengths)
    return step + 1, constrain_cache(new_state["cache"]), token, tokens, done, lengths

  carry = (jnp.ones((), jnp.int32), state["cache"], token, tokens, done, lengths)
  for end in ends:
    carry = (carry[0], grow_cache(carry[1], prompt_length + end)) + carry[2:]
    carry = jax.lax.while_loop(functools.partial(cond, end=end), body, carry)
  _, _, _, tokens, _, lengths = carry
  return tokens, lengths


def jit_generate(model: nn.Module, config: DecodingConfig, seed: int = 0, mesh: Optional[Mesh] = None,
                 rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES):
  """`generate` under jit: (params, prompt_tokens, prompt_mask, row_seeds) -> numpy (tokens, lengths).

  With a mesh: explicit shardings (params by the rules, prompt rows over the data-parallel axes, outputs
  replicated); every process passes the whole batch as host arrays and gets the whole output back. Call it inside
  `partitioning.activation_rules(mesh, rules)`.
  """
  fn = functools.partial(generate, model, config=config, seed=seed)
  return partitioning.jit_host_io(fn, functools.partial(common.init_params, model),
                                  [("batch", "length"), ("batch", "length"), ("batch",)], mesh, rules)


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
  """(text up to the first stop string, whether one was found)."""
  cuts = [text.find(stop) for stop in stop_strings if stop and stop in text]
  return (text[:min(cuts)], True) if cuts else (text, False)


def bucket_length(length: int, max_length: int, minimum: int = 16) -> int:
  """The padded prompt length for a prompt of `length` tokens: rounded up to a multiple of a quarter of the largest
  power of two below it (at least `minimum`), capped at `max_length`. Four buckets per power of two: few shapes to
  compile, and padding under a quarter of the prompt's length once prompts are longer than 4 x minimum.

  E.g. 100 -> 112, 130 -> 160, 1000 -> 1024.
  """
  if length > max_length:
    raise ValueError(f"prompt of {length} tokens is longer than the maximum {max_length}")
  octave = 1 << max((length - 1).bit_length() - 1, 0)  # the largest power of two below length
  step = max(minimum, octave // 4)
  return min(max(minimum, -(-length // step) * step), max_length)


def batch_rows(rows: int, batch_size: int, row_multiple: int = 1) -> int:
  """How many rows a batch holding `rows` real rows is computed with: `batch_size` for a full batch; for the last,
  partial one the next power of two (at least `row_multiple`, the data-parallel mesh size, and a multiple of it), so
  few filler rows are computed and few batch shapes compile."""
  if rows >= batch_size:
    return batch_size
  padded = max(1 << max(rows - 1, 0).bit_length(), row_multiple)
  return min(-(-padded // row_multiple) * row_multiple, batch_size)


def plan_batches(lengths: Sequence[int], batch_size: int, max_length: int) -> list[tuple[list[int], int]]:
  """Groups prompts into batches of similar length.

  Args:
    lengths: prompt lengths in tokens; batch_size: rows per batch; max_length: the longest allowed prompt.

  Returns:
    [(indices into `lengths` (at most batch_size), padded prompt length)], prompts sorted by length (ties by index),
    so the plan depends only on the lengths.
  """
  order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
  batches = []
  for start in range(0, len(order), batch_size):
    indices = order[start:start + batch_size]
    batches.append((indices, bucket_length(max(lengths[i] for i in indices), max_length)))
  return batches


def left_pad(rows: Sequence[Sequence[int]], length: Optional[int] = None, pad_id: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> left-padded tokens and mask, int32 [len(rows), length] numpy arrays."""
  length = length or max(len(row) for row in rows)
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    if len(row) > length:
      raise ValueError(f"row {i} has {len(row)} tokens, more than the padded length {length}")
    if row:
      tokens[i, length - len(row):], mask[i, length - len(row):] = row, 1
  return tokens, mask
