"""How fast the annotation benchmark's decoding could be on this machine: hardware limits and XLA's kernels.

Reads the figures of an `annotate_throughput.py --json` run (model, prompt batches, new tokens, decoding phases, ours'
and the peer's seconds) and measures on this machine, in one process (jax only, no torch), float32:

  1. the machine's limits: memory bandwidth (`jnp.sum` over 256 MB) and the matmul peak (a 2048^3 matmul),
     each from its fastest call;
  2. XLA's kernels at the run's shapes (median calls): every matmul of one decode step (each layer's QKV, output
     projection and MLP with its own weights, then the LM head; chained as in a step) at the run's batch size, and
     the model's own attention (`common.attention` over a head-major cache, every layer) over each phase's cache length;
  3. the prefill as ours runs it: `decoding.jit_generate` with one new token, per batch shape.

Then it adds these up over the run's batches, phases and steps into
  - the hardware floor: each step's matmul FLOPs at the peak plus its cache bytes (keys and values of every layer
    up to the step's position, nothing more) at the bandwidth, one after the other as XLA's CPU backend runs
    them, or fully overlapped (the larger of FLOPs at the peak and cache + weight bytes at the bandwidth); the
    prefills' FLOPs at the peak;
  - XLA's kernels alone: measured prefills + per phase (matmuls + attention) x steps, leaving out everything else
    a step does (LayerNorms, GeLU, cache writes, sampling);
and prints both next to ours and the peer as measured in that run, with the ratio each would give.

  python bench/annotate_throughput.py --lengths fixed --json annotate.json   (or a --lengths lognormal run)
  python bench/decode_floor.py annotate.json [--repeats 30] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward_throughput import (background_cores, cpu_model, cpu_seconds, markdown_table,  # noqa: E402
                                warn_if_busy)

from teacherlm_jax import decoding  # noqa: E402
from teacherlm_jax.models import bloom, common# noqa: E402

FLOAT_BYTES = 4


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
  """The command-line flags (the run's JSON, repeats, output file)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("run", help="the JSON an `annotate_throughput.py --json` run wrote")
  parser.add_argument("--repeats", type=int, default=30,
                      help="timed calls of each kernel (the median counts; a tenth as many prefills)")
  parser.add_argument("--json", default=None, metavar="OUT", help="also write the figures to this JSON file")
  return parser.parse_args(argv)


def median_seconds(fn: Callable[..., Any], *args: Any, repeats: int, best: bool = False) -> float:
  """Median (or with `best`, the least) wall-clock seconds of `fn(*args)` (a jitted function, waited for), after
  a first call that compiles."""
  jax.block_until_ready(fn(*args))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    seconds.append(time.perf_counter() - start)
  return min(seconds) if best else statistics.median(seconds)


def machine_limits(repeats: int) -> dict[str, float]:
  """Memory bandwidth (bytes/s of a 256 MB sum) and the float32 matmul peak (FLOP/s of a 2048^3 matmul), each from
  its fastest call: the limits, not typical rates."""
  array = jnp.ones((64 << 20,), jnp.float32)
  bandwidth = array.size * FLOAT_BYTES / median_seconds(jax.jit(jnp.sum), array, repeats=repeats, best=True)
  a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
  peak = 2 * 2048 ** 3 / median_seconds(jax.jit(jnp.matmul), a, a, repeats=repeats, best=True)
  return {"bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": peak}


def step_matmuls(config: bloom.BloomConfig, rows: int, repeats: int) -> float:
  """Seconds of one decode step's matmuls at `rows` rows, as XLA runs them: per layer x [rows, e] through QKV
  [e, 3e], the output projection [e, e], the MLP [e, 4e] and [4e, e]; then the LM head [e, vocab]."""
  e, keys = config.hidden_size, iter(jax.random.split(jax.random.key(1), 4 * config.num_layers + 2))
  shapes = [(e, 3 * e), (e, e), (e, config.mlp_dim), (config.mlp_dim, e)] * config.num_layers + [(e, config.vocab_size)]
  weights = [0.02 * jax.random.normal(next(keys), shape, jnp.float32) for shape in shapes]
  x = jax.random.normal(next(keys), (rows, e), jnp.float32)

  def step(x, weights):
    for qkv, dense, wi, wo in zip(*[iter(weights[:-1])] * 4):
      x = (x @ qkv)[:, :e] @ dense
      x = (x @ wi) @ wo
    return x @ weights[-1]
  return median_seconds(jax.jit(step), x, weights, repeats=repeats)


def step_attention(config: bloom.BloomConfig, rows: int, length: int, repeats: int) -> float:
  """Seconds of one decode step's attention over a cache of `length` slots, every layer, as the model computes it
  (`common.attention` over a head-major cache: scores, softmax, values)."""
  h, d = config.num_heads, config.head_dim
  keys = iter(jax.random.split(jax.random.key(2), 2 * config.num_layers + 1))
  caches = [jax.random.normal(next(keys), (rows, h, length, d), jnp.float32) for _ in range(2 * config.num_layers)]
  q = jax.random.normal(next(keys), (rows, 1, h, d), jnp.float32)
  bias = jnp.zeros((rows, h, 1, length), jnp.float32)

  def attend(q, caches):
    for k, v in zip(caches[0::2], caches[1::2]):
      q = common.attention(q, k, v, bias, head_major=True)
    return q
  return median_seconds(jax.jit(attend), q, caches, repeats=repeats)


def prefill(model: bloom.Bloom, params: Any, rows: int, length: int, repeats: int) -> float:
  """Seconds of ours' prefill of `rows` prompts of `length` tokens: `decoding.jit_generate` with one new token."""
  generate = decoding.jit_generate(model, decoding.DecodingConfig(1, eos_id=-1, temperature=1.0))
  tokens = np.random.default_rng(0).integers(3, model.config.vocab_size, (rows, length)).astype(np.int32)
  args = (params, tokens, np.ones_like(tokens), np.arange(rows, dtype=np.int32))
  return median_seconds(generate, *args, repeats=max(1, repeats // 10))


def matmul_flops(config: bloom.BloomConfig, rows: int) -> float:
  """FLOPs of one decode step's matmuls (QKV, output projection, MLP of every layer, LM head) at `rows` rows."""
  e = config.hidden_size
  return 2.0 * rows * ((4 * e * e + 2 * e * config.mlp_dim) * config.num_layers + e * config.vocab_size)


def cache_bytes(config: bloom.BloomConfig, rows: int, length: int) -> float:
  """Bytes of cached keys and values (every layer) that a step attending over `length` slots reads."""
  return 2.0 * config.num_layers * rows * config.hidden_size * length * FLOAT_BYTES


def prefill_flops(config: bloom.BloomConfig, rows: int, length: int) -> float:
  """FLOPs of a prefill: the layers' matmuls at every position, causal attention, the LM head at the last one."""
  e = config.hidden_size
  layer = (4 * e * e + 2 * e * config.mlp_dim) * length + e * length * length  # q k^T and p v over the causal half
  return 2.0 * rows * (layer * config.num_layers + e * config.vocab_size)


def phases(ends: list[int]) -> list[tuple[int, int]]:
  """[(new tokens at the phase's end, model steps in it)]: the first new token comes from the prefill."""
  starts = [1] + ends[:-1]
  return [(end, end - start) for start, end in zip(starts, ends)]


def estimates(run: dict[str, Any], config: bloom.BloomConfig, limits: dict[str, float], measure: dict[str, Any]
              ) -> dict[str, float]:
  """Seconds over all the run's batches: hardware floors (kernels in turn / fully overlapped) and XLA's kernels."""
  peak, bandwidth = limits["matmul_flops_per_s"], limits["bandwidth_bytes_per_s"]
  weight_bytes = matmul_flops(config, 1) / 2 * FLOAT_BYTES
  in_turn = overlapped = kernels = 0.0
  for _, rows, length in run["prompts"]["batches"]:
    prefill_floor = prefill_flops(config, rows, length) / peak
    in_turn, overlapped = in_turn + prefill_floor, overlapped + prefill_floor
    for step in range(1, run["new_tokens"]):
      flops, read = matmul_flops(config, rows), cache_bytes(config, rows, length + step)
      in_turn += flops / peak + read / bandwidth
      overlapped += max(flops / peak, (read + weight_bytes) / bandwidth)
    kernels += measure["prefill"][(rows, length)]
    for end, steps in phases(run["phase_ends"]):
      kernels += steps * (measure["matmuls"][rows] + measure["attention"][(rows, length + end)])
  return {"floor_overlapped_s": overlapped, "floor_in_turn_s": in_turn, "xla_kernels_s": kernels}


def measure_kernels(run: dict[str, Any], config: bloom.BloomConfig, repeats: int) -> dict[str, Any]:
  """XLA's seconds for the run's shapes: step matmuls per batch size, attention per cache length, prefills."""
  model = bloom.Bloom(config)
  params = nn.unbox(common.init_params(model, jax.random.key(0)))
  measured: dict[str, Any] = {"matmuls": {}, "attention": {}, "prefill": {}}
  for _, rows, length in run["prompts"]["batches"]:
    if rows not in measured["matmuls"]:
      measured["matmuls"][rows] = step_matmuls(config, rows, repeats)
    for end, _ in phases(run["phase_ends"]):
      if (rows, length + end) not in measured["attention"]:
        measured["attention"][(rows, length + end)] = step_attention(config, rows, length + end, repeats)
    if (rows, length) not in measured["prefill"]:
      measured["prefill"][(rows, length)] = prefill(model, params, rows, length, repeats)
  return measured


def format_table(figures: dict[str, Any]) -> str:
  """The estimates next to the run's measured seconds, with their ratios to the peer, then the kernel figures."""
  peer, limits = figures["peer_all_prompts_s"], figures["limits"]
  rows = [("", "seconds for the run's prompts", "ratio to the peer (samples/s)")]
  for label, key in (("the peer (transformers generate, batch 1), measured in the run", "peer_all_prompts_s"),
                     ("ours (annotate.decode_rows), measured in the run", "ours_s"),
                     ("XLA's kernels alone (matmuls + attention per step, prefills), measured here",
                      "xla_kernels_s"),
                     ("floor, kernels in turn (matmul FLOPs at the peak + cache bytes at the bandwidth)",
                      "floor_in_turn_s"),
                     ("floor, compute and memory fully overlapped", "floor_overlapped_s")):
    rows.append((label, f"{figures[key]:.2f}", f"{peer / figures[key]:.1f}x"))
  rows.append((f"target {figures['target_ratio']:.0f}x", f"{peer / figures['target_ratio']:.2f}",
               f"{figures['target_ratio']:.0f}x"))
  per_step = "; ".join(f"{rows} rows: matmuls {seconds * 1e3:.2f} ms" for rows, seconds in figures["matmuls_ms"])
  attention = "; ".join(f"{rows} x {length}: {seconds * 1e3:.2f} ms" for rows, length, seconds in
                        figures["attention_ms"])
  return (markdown_table(rows) + "\n\n"
          f"machine: {figures['cpu']}, {figures['cores']} cores; bandwidth {limits['bandwidth_bytes_per_s'] / 1e9:.1f}"
          f" GB/s (sum of 256 MB), matmul peak {limits['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s (2048^3); "
          f"cores kept busy by others: {figures['background_cores']}\n"
          f"step matmuls: {per_step} ({figures['matmul_gflops']:.0f} GFLOP/s)\n"
          f"attention per step (rows x cache slots): {attention}\n"
          f"prefills: {'; '.join(f'{r} x {l}: {s:.2f} s' for r, l, s in figures['prefill_s'])}\n"
          f"run: {figures['run']}")


def slot_floors(run: dict[str, Any], config: bloom.BloomConfig, limits: dict[str, float], repeats: int
                ) -> dict[str, Any]:
  """A `--lengths lognormal` run: the floor (kernels in turn) of ours with slots and of the static batches, from
  the row-steps and cache columns each computed, next to what the run measured.

  slots: its row-steps' matmuls (B rows a step, fewer once compacted) + the cache columns its attention read
  (every slot its tier's window) at the bandwidth, and the same with only the live columns (a ragged kernel);
  static: every batch's steps at its rows, each phase's cache length; prefills of every prompt at the peak on both
  sides."""
  peak, bandwidth = limits["matmul_flops_per_s"], limits["bandwidth_bytes_per_s"]
  column = cache_bytes(config, 1, 1)
  slots, static, b = run["slots"], run["static"], run["slots_count"]
  prefills = run["prompts"] * prefill_flops(config, 1, run["prompt_bucket"]) / peak
  matmul_s = step_matmuls(config, b, repeats)
  slot_matmuls = slots["row_steps"] * matmul_flops(config, 1) / peak  # compacted steps compute fewer rows
  figures = {
      "slots_floor_s": prefills + slot_matmuls + slots["columns_read"] * column / bandwidth,
      "slots_ragged_floor_s": prefills + slot_matmuls + slots["live_columns"] * column / bandwidth,
      "slots_xla_matmuls_s": slots["row_steps"] / b * matmul_s, "static_floor_s": prefills, "static_xla_matmuls_s": 0.0,
      "slots_row_steps": slots["row_steps"], "static_row_steps": static["row_steps"],
      "slots_occupancy": slots["occupancy"], "static_occupancy": static["occupancy"],
      "slots_s": slots["seconds"], "static_s": static["seconds"], "matmul_ms_at_slots": matmul_s * 1e3}
  for rows, length, new_tokens in static["batches"]:
    ends = [end for end in run["phase_ends"] if end < new_tokens] + [new_tokens]
    for end, steps in phases(ends):
      figures["static_floor_s"] += steps * (matmul_flops(config, rows) / peak
                                            + cache_bytes(config, rows, length + end) / bandwidth)
    figures["static_xla_matmuls_s"] += (new_tokens - 1) * (matmul_s if rows == b else step_matmuls(config, rows, 3))
  return figures


def format_slot_table(figures: dict[str, Any], limits: dict[str, float]) -> str:
  f = figures
  rows = [("", "row-steps", "occupancy", "floor, kernels in turn (s)", "XLA's step matmuls alone (s)",
           "measured (s)"),
          ("ours, slots", f"{f['slots_row_steps']:,}", f"{f['slots_occupancy']:.1%}", f"{f['slots_floor_s']:.1f}"
           f" (live columns only: {f['slots_ragged_floor_s']:.1f})", f"{f['slots_xla_matmuls_s']:.1f}",
           f"{f['slots_s']:.1f}"),
          ("ours, static batches", f"{f['static_row_steps']:,}", f"{f['static_occupancy']:.1%}",
           f"{f['static_floor_s']:.1f}", f"{f['static_xla_matmuls_s']:.1f}", f"{f['static_s']:.1f}"),
          ("static / slots", f"{f['static_row_steps'] / f['slots_row_steps']:.2f}x", "",
           f"{f['static_floor_s'] / f['slots_floor_s']:.2f}x", "", f"{f['static_s'] / f['slots_s']:.2f}x")]
  lines = [f"| {' | '.join(row)} |" for row in rows]
  lines.insert(1, "| --- |" + " ---: |" * (len(rows[0]) - 1))
  return ("\n".join(lines) + f"\n\nbandwidth {limits['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, matmul peak "
          f"{limits['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s; step matmuls at the slot count "
          f"{f['matmul_ms_at_slots']:.2f} ms")


def main(argv: Optional[list[str]] = None) -> int:
  args = parse_args(argv)
  with open(args.run, encoding="utf-8") as file:
    run = json.load(file)
  shape = run["config"]
  config = bloom.BloomConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                             num_layers=shape["num_layers"], num_heads=shape["num_heads"], scan_layers=False)
  if run.get("lengths") == "lognormal":
    limits = machine_limits(args.repeats)
    figures = {"limits": limits, **slot_floors(run, config, limits, args.repeats), "cpu": cpu_model()}
    print(format_slot_table(figures, limits))
    if args.json:
      with open(args.json, "w", encoding="utf-8") as out:
        json.dump(figures, out, indent=2)
    return 0
  before = cpu_seconds()
  limits = machine_limits(args.repeats)
  measured = measure_kernels(run, config, args.repeats)
  background = background_cores(before, cpu_seconds())
  warn_if_busy(background, os.cpu_count() or 1)
  peer = run["transformers"]["total_s"] / run["transformers"]["prompts"] * run["prompts"]["count"]
  rows = run["prompts"]["batches"][0][1]
  figures = {
      "run": f"{args.run} ({run['date']}): {run['prompts']['count']} prompts in batches {run['prompts']['batches']}"
             f", {run['new_tokens']} new tokens, phases ending at {run['phase_ends']}",
      "peer_all_prompts_s": peer, "ours_s": run["teacherlm_jax"]["median_s"], "target_ratio": run["target_ratio"],
      "limits": limits, **estimates(run, config, limits, measured),
      "matmuls_ms": sorted(measured["matmuls"].items()),
      "matmul_gflops": matmul_flops(config, rows) / measured["matmuls"][rows] / 1e9,
      "attention_ms": sorted((r, l, s) for (r, l), s in measured["attention"].items()),
      "prefill_s": sorted((r, l, s) for (r, l), s in measured["prefill"].items()),
      "cpu": cpu_model(), "cores": os.cpu_count(),
      "background_cores": None if background is None else round(background, 2),
  }
  print(format_table(figures))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as out:
      json.dump(figures, out, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
