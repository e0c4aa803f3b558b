"""Batched autoregressive decoding inside jit: one prefill pass over the prompts, then a `lax.while_loop` of token steps
over the KV cache, stopping as soon as every row has produced EOS or `max_new_tokens`.

Prompts are left-padded ([batch, prompt_length] with a mask), so every row's next token is read at the same column.
Greedy decoding (temperature 0) or sampling with temperature, top-k and top-p. Every row samples with its own key,
`fold_in(fold_in(PRNGKey(seed), row_seed), step)`, so with a fixed seed a record's output does not depend on which
batch, or which position in it, the record landed in.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from teacherlm_jax.models import bloom


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
  """

  max_new_tokens: int = 64
  eos_id: int = 2
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  pad_id: int = 0


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


def next_tokens(logits: jax.Array, keys: jax.Array, config: DecodingConfig) -> jax.Array:
  """The next token of every row [b] from its logits [b, v] (float32) and its key [b]."""
  if config.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, config)
  return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered).astype(jnp.int32)


def generate(model: bloom.Bloom, params, prompt_tokens: jax.Array, prompt_mask: jax.Array, row_seeds: jax.Array,
             config: DecodingConfig, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """Continues left-padded prompts.

  Args:
    model, params: the model.
    prompt_tokens: [b, l] int32, left-padded; prompt_mask: [b, l], 1 for prompt tokens.
    row_seeds: [b] int32, one per record (e.g. its index in the dataset): its sampling stream.
    config: decoding settings; seed: the run's sampling seed.

  Returns:
    tokens [b, max_new_tokens] int32 (pad_id after a row's EOS) and lengths [b] (generated tokens, EOS included).
  """
  batch, prompt_length = prompt_tokens.shape
  cache = bloom.init_cache(model, batch, prompt_length + config.max_new_tokens)
  logits, state = model.apply({"params": params, "cache": cache}, prompt_tokens, prompt_mask, decode=True,
                              mutable=["cache"])
  base = jax.random.key(seed)
  row_keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(row_seeds)

  def cond(carry):
    step, _, _, _, done, _ = carry
    return (step < config.max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, cache, last_logits, tokens, done, lengths = carry
    keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(row_keys)
    token = next_tokens(last_logits.astype(jnp.float32), keys, config)
    token = jnp.where(done, config.pad_id, token)
    tokens = tokens.at[:, step].set(token)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | (token == config.eos_id)
    step_logits, new_state = model.apply({"params": params, "cache": cache}, token[:, None], decode=True,
                                         mutable=["cache"])
    return step + 1, new_state["cache"], step_logits[:, -1], tokens, done, lengths

  init = (jnp.zeros((), jnp.int32), state["cache"], logits[:, -1],
          jnp.full((batch, config.max_new_tokens), config.pad_id, jnp.int32), jnp.zeros((batch,), bool),
          jnp.zeros((batch,), jnp.int32))
  _, _, _, tokens, _, lengths = jax.lax.while_loop(cond, body, init)
  return tokens, lengths


def jit_generate(model: bloom.Bloom, config: DecodingConfig, seed: int = 0):
  """`generate` under jit: (params, prompt_tokens, prompt_mask, row_seeds) -> (tokens, lengths)."""
  return jax.jit(functools.partial(generate, model, config=config, seed=seed))


def left_pad(rows: list[list[int]], length: Optional[int] = None, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Token lists -> left-padded tokens and mask [len(rows), length]."""
  length = length or max(len(row) for row in rows)
  tokens = [[pad_id] * (length - len(row)) + list(row) for row in rows]
  mask = [[0] * (length - len(row)) + [1] * len(row) for row in rows]
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
