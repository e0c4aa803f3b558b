"""`annotate_throughput.py --lengths lognormal` (its default): annotation decoding with EOS-terminated outputs of
long-tailed lengths, four ways side by side in one process, on the same weights and prompts.

Every prompt gets a target output length, drawn seeded: log-normal with median `--median_tokens` (200) and sigma
`--sigma` (0.7), clipped to [1, --cap], and `--at_cap` (5%) of the prompts at the cap (1,024). Every side stops a
row exactly there, as an EOS at that step would (sampling at temperature 1.0, no EOS before):
  - ours, slots: the annotation loop's engine (`teacherlm_jax.engine.Engine`, `--batch_size` slots, `--tiers`,
    `--steps_per_call`), each request's `max_new_tokens` = its target;
  - ours, static: today's static batches (`decoding.plan_batches` by prompt length, `decoding.generate` with
    `row_limits` = the targets), each batch until its slowest row stops;
  - Hugging Face `generate`, batch 1 (the release's loop), on `--hf_prompts` prompts (evenly spread);
  - Hugging Face `generate` with left-padded batches, at the best of `--hf_batch_sizes` on `--hf_batched_prompts`
    prompts (evenly spread).
On the HF sides a logits processor forbids EOS before a row's target and forces it at the target.

Prompts: the `--teacher` prompts of the 200 embedded ECQA and CREAK records, cycled when `--num_prompts` asks for
more (the prompt matters little here: each request has its own target). Figures: generated tokens/s of each
(tokens kept / seconds), the ratios, and the engine's occupancy (row-steps that produced a kept token / row-steps
computed), whole run and until the last prompt entered (steady state: a run of a real dataset is all steady state;
the end of a finite one is a drain, the last long rows finishing alone). Ours with slots is timed in its first run,
less the seconds jax reports compiling in it (its `/jax/core/compile/` events: every tier-window combination
compiles its own `generate` once); the static batches are compiled first by a run with every row limited to one
token.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from annotate_throughput import REPO, TOKENIZER, build_teacher, load_prompts  # noqa: E402
from forward_throughput import (background_cores, cpu_model, cpu_seconds, import_torch, publish,  # noqa: E402
                                run_environment, torch_on_all_cores, warn_if_busy)

from teacherlm_jax import decoding, engine, partitioning, vocabularies  # noqa: E402
from teacherlm_jax.models import common  # noqa: E402


def target_lengths(args, count: int) -> np.ndarray:
  """Seeded targets: log-normal (median, sigma) clipped to [1, cap], round(at_cap x count) prompts at the cap."""
  rng = np.random.default_rng(args.seed)
  lengths = np.clip(np.round(np.exp(rng.normal(math.log(args.median_tokens), args.sigma, count))), 1, args.cap)
  lengths[rng.choice(count, int(round(args.at_cap * count)), replace=False)] = args.cap
  return lengths.astype(np.int32)


def tiers_of(args, prompt_length: int, row_multiple: int):
  if args.tiers == "long_tail":
    return engine.long_tail_tiers(args.batch_size, prompt_length, args.cap, row_multiple)
  if args.tiers == "one":
    return None
  return tuple(tuple(int(v) for v in tier.split(":")) for tier in args.tiers.split(","))


class CompileClock:
  """Seconds jax spent tracing, lowering and compiling (its `/jax/core/compile/` duration events) since `reset`."""

  def __init__(self):
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._event)

  def _event(self, event: str, duration: float, **_) -> None:
    if event.startswith("/jax/core/compile/"):
      self.seconds += duration

  def reset(self) -> None:
    self.seconds = 0.0


COMPILES = CompileClock()


def run_slots(slots: engine.Engine, rows, targets) -> dict[str, Any]:
  """One engine run over every prompt: seconds (compiling excluded: every tier-window combination compiles its own
  `generate` the first time it occurs), tokens, occupancy (whole run and until the last prompt entered)."""
  before = dataclass_copy(slots.stats)
  COMPILES.reset()
  entered = {}
  requests = (engine.Request(index, ids, index, 1, int(target)) for (index, ids, _), target in zip(rows, targets))

  def tracked():
    for request in requests:
      yield request
    entered.update(dataclass_copy(slots.stats).__dict__)  # the last prompt was pulled
    entered["seconds"], entered["compile_s"] = time.perf_counter() - start, COMPILES.seconds
  start = time.perf_counter()
  outputs = {f.key: len(f.ids) for f in slots.run(tracked())}
  wall = time.perf_counter() - start
  seconds, compile_s = wall - COMPILES.seconds, COMPILES.seconds
  stats = slots.stats
  steady_row_steps = entered["row_steps"] - before.row_steps
  return {"seconds": seconds, "wall_s": wall, "compile_s": compile_s, "tokens": sum(outputs.values()),
          "outputs": outputs,
          "steps": stats.steps - before.steps, "occupancy": (stats.kept - before.kept) / (
              stats.row_steps - before.row_steps),
          "steady_occupancy": (entered["kept"] - before.kept) / max(steady_row_steps, 1),
          "steady_tokens_per_s": (entered["kept"] - before.kept) / (entered["seconds"] - entered["compile_s"]),
          "prefills": stats.prefills - before.prefills, "moves": stats.moves - before.moves,
          "compactions": stats.compactions - before.compactions, "row_steps": stats.row_steps - before.row_steps, "columns_read": stats.columns_read - before.columns_read,
          "live_columns": stats.live_columns - before.live_columns}


def dataclass_copy(stats: engine.EngineStats) -> engine.EngineStats:
  return engine.EngineStats(**stats.__dict__)


def static_generate(model, mesh, config):
  """`decoding.generate` with per-row limits, jitted on the mesh as `decoding.jit_generate` is."""
  fn = lambda p, t, m, s, l: decoding.generate(model, p, t, m, s, config, 0, row_limits=l)  # noqa: E731
  return partitioning.jit_host_io(fn, lambda r: common.init_params(model, r),
                                  [("batch", "length"), ("batch", "length"), ("batch",), ("batch",)], mesh)


def run_static(generate, params, mesh, rows, targets, batch_size: int, limits=None) -> dict[str, Any]:
  """Today's static batches (sorted by length, padded to buckets) with per-row limits: seconds, tokens, steps."""
  limits = targets if limits is None else limits
  plan = decoding.plan_batches([len(ids) for _, ids, _ in rows], batch_size, 512)
  multiple = partitioning.data_parallel_size(mesh)
  tokens, row_steps, batches = 0, 0, []
  start = time.perf_counter()
  with partitioning.activation_rules(mesh):
    for positions, length in plan:
      batch = [rows[p] for p in positions]
      filler = decoding.batch_rows(len(batch), batch_size, multiple) - len(batch)
      ids, mask = decoding.left_pad([r[1] for r in batch] + [batch[0][1]] * filler, length)
      limit = np.asarray([limits[p] for p in positions] + [1] * filler, np.int32)
      _, lengths = generate(params, ids, mask, np.asarray([r[0] for r in batch] + [0] * filler, np.int32), limit)
      tokens += int(lengths[:len(batch)].sum())
      row_steps += int(lengths.max()) * len(lengths)
      batches.append([len(lengths), length, int(lengths.max())])  # rows computed, prompt length, new tokens
  return {"seconds": time.perf_counter() - start, "tokens": tokens, "occupancy": tokens / row_steps,
          "row_steps": row_steps, "batches": batches}


def hf_run(torch, hf_model, rows, targets, batch_size: int) -> dict[str, Any]:
  """HF `generate` (sampling, temperature 1) in left-padded batches; a row stops with EOS at its target."""
  from transformers import LogitsProcessor, LogitsProcessorList
  eos = hf_model.config.eos_token_id
  pad = hf_model.config.pad_token_id if hf_model.config.pad_token_id is not None else eos

  class EosAtTarget(LogitsProcessor):
    def __init__(self, start: int, limits):
      self.start, self.limits = start, torch.tensor(limits)

    def __call__(self, input_ids, scores):
      step = input_ids.shape[1] - self.start + 1  # the new token's number
      at = self.limits == step
      scores[~at, eos] = -float("inf")
      scores[at] = -float("inf")
      scores[at, eos] = 0.0
      return scores

  tokens, start = 0, time.perf_counter()
  for first in range(0, len(rows), batch_size):
    batch, limits = rows[first:first + batch_size], targets[first:first + batch_size]
    width = max(len(ids) for _, ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (_, ids, _) in enumerate(batch):
      input_ids[i, width - len(ids):], mask[i, width - len(ids):] = torch.tensor(ids), 1
    with torch.inference_mode():
      out = hf_model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                              temperature=1.0, max_new_tokens=int(max(limits)), eos_token_id=eos, pad_token_id=pad,
                              use_cache=True, logits_processor=LogitsProcessorList([EosAtTarget(width, limits)]))
    for row in out[:, width:].tolist():  # up to and including the row's EOS
      tokens += row.index(eos) + 1 if eos in row else len(row)
  return {"seconds": time.perf_counter() - start, "tokens": tokens, "prompts": len(rows), "batch_size": batch_size}


def spread(items, count: int):
  return [items[i * len(items) // count] for i in range(count)]


def run(args) -> int:
  torch, transformers = import_torch()
  cores = torch_on_all_cores(torch)
  vocabulary = vocabularies.HfTokenizerVocabulary(os.path.join(REPO, TOKENIZER))
  embedded = load_prompts(argparse.Namespace(**{**vars(args), "num_prompts": min(args.num_prompts, 200)}),
                          vocabulary)
  rows = [(i, embedded[i % len(embedded)][1], 0) for i in range(args.num_prompts)]  # cycled past the 200 records
  targets = target_lengths(args, len(rows))
  mesh = partitioning.make_mesh(1, -1, 1)
  hf_model, model, params = build_teacher(args, torch, transformers, mesh)
  prompt_bucket = decoding.bucket_length(max(len(ids) for _, ids, _ in rows), args.max_input_length)
  print(f"{len(rows)} prompts of {min(len(r[1]) for r in rows)} .. {max(len(r[1]) for r in rows)} tokens; targets "
        f"median {np.median(targets):.0f}, mean {targets.mean():.1f}, {int((targets == args.cap).sum())} at the cap "
        f"{args.cap}; {int(targets.sum())} tokens in all")
  config = decoding.DecodingConfig(max_new_tokens=args.cap, eos_id=-1, temperature=1.0, pad_id=vocabulary.pad_id,
                                   first_phase_tokens=args.first_phase_tokens, phase_growth=args.phase_growth)
  tiers = tiers_of(args, prompt_bucket, partitioning.data_parallel_size(mesh))
  generate = static_generate(model, mesh, config)
  run_static(generate, params, mesh, rows, targets, args.batch_size, limits=np.ones(len(rows), np.int32))  # compile
  before = cpu_seconds()
  with partitioning.activation_rules(mesh):
    slots = engine.Engine(model, params, config, slots=args.batch_size, max_prompt_length=prompt_bucket,
                          tiers=tiers, steps_per_call=args.steps_per_call, seed=args.seed, mesh=mesh)
    ours = run_slots(slots, rows, targets)
  print(f"ours, slots (tiers {slots.tiers}): {ours['tokens']} tokens in {ours['seconds']:.1f} s ({ours['wall_s']:.1f}"
        f" s wall, {ours['compile_s']:.1f} s of it compiling {len(slots._jits)} programs), occupancy "
        f"{ours['occupancy']:.1%}")
  static = run_static(generate, params, mesh, rows, targets, args.batch_size)
  print(f"ours, static: {static['tokens']} tokens in {static['seconds']:.1f} s, occupancy {static['occupancy']:.1%}")
  torch.manual_seed(args.seed)
  index = {r[0]: i for i, r in enumerate(rows)}
  trial_rows = spread(rows, args.hf_batched_prompts)
  trial_targets = np.asarray([targets[index[r[0]]] for r in trial_rows])
  batched = [hf_run(torch, hf_model, trial_rows, trial_targets, int(b)) for b in args.hf_batch_sizes.split(",")]
  for trial in batched:
    print(f"HF generate, batch {trial['batch_size']}: {trial['tokens']} tokens in {trial['seconds']:.1f} s")
  release_rows = spread(rows, args.hf_prompts)
  release = hf_run(torch, hf_model, release_rows, np.asarray([targets[index[r[0]]] for r in release_rows]), 1)
  print(f"HF generate, batch 1: {release['tokens']} tokens in {release['seconds']:.1f} s")
  background = background_cores(before, cpu_seconds())
  warn_if_busy(background, cores)
  hf_expected = [int(trial_targets.sum())] * len(batched) + [sum(int(targets[index[r[0]]]) for r in release_rows)]
  if ours["tokens"] != int(targets.sum()) or static["tokens"] != int(targets.sum()) or [
      t["tokens"] for t in batched + [release]] != hf_expected:
    print("error: a side did not generate every target length", file=sys.stderr)
    return 1
  rate = lambda side: side["tokens"] / side["seconds"]  # noqa: E731
  best = max(batched, key=rate)
  figures = {
      "slots": {k: v for k, v in ours.items() if k != "outputs"}, "static": static, "hf_batched": batched,
      "hf_best_batch": best["batch_size"], "hf_release": release,
      "tokens_per_s": {"slots": rate(ours), "static": rate(static), "hf_batched": rate(best),
                       "hf_release": rate(release)},
      "ratios": {"static": rate(ours) / rate(static), "hf_batched": rate(ours) / rate(best),
                 "hf_release": rate(ours) / rate(release)},
      "targets": {"median": float(np.median(targets)), "mean": float(targets.mean()), "cap": args.cap,
                  "at_cap": int((targets == args.cap).sum()), "tokens": int(targets.sum()),
                  "sigma": args.sigma, "median_tokens": args.median_tokens},
      "prompts": len(rows), "prompt_bucket": prompt_bucket, "slots_count": args.batch_size,
      "tiers": [list(t) for t in slots.tiers], "steps_per_call": args.steps_per_call,
      "num_params": common.count_params(params), "lengths": "lognormal",
      "config": {"hidden_size": args.hidden_size, "num_layers": args.num_layers, "num_heads": args.num_heads,
                 "vocab_size": args.vocab_size, "dtype": "float32"},
      "phase_ends": decoding.phase_ends(config), "compiled_programs": len(slots._jits), "cpu": cpu_model(), "cores": cores,
      "background_cores": background, **run_environment(torch, transformers),
  }
  r = figures["ratios"]
  last = (f"occupancy {ours['occupancy']:.1%} | {r['static']:.2f}x static | {r['hf_batched']:.2f}x batched generate "
          f"| {r['hf_release']:.1f}x release")
  table = "\n".join([
      "| side | generated tokens/s | seconds | tokens |", "| --- | ---: | ---: | ---: |",
      f"| ours, slots ({args.batch_size}, tiers {list(slots.tiers)}) | {rate(ours):.1f} | {ours['seconds']:.1f} | "
      f"{ours['tokens']} |",
      f"| ours, static batches of {args.batch_size} | {rate(static):.1f} | {static['seconds']:.1f} | "
      f"{static['tokens']} |",
      f"| HF generate, batch {best['batch_size']} (best of {args.hf_batch_sizes}) | {rate(best):.1f} | "
      f"{best['seconds']:.1f} | {best['tokens']} |",
      f"| HF generate, batch 1 (release) | {rate(release):.1f} | {release['seconds']:.1f} | {release['tokens']} |",
      "", f"occupancy: slots {ours['occupancy']:.1%} (until the last prompt entered {ours['steady_occupancy']:.1%}, "
      f"{ours['steady_tokens_per_s']:.1f} tokens/s from the steps), "
      f"static {static['occupancy']:.1%}; slots: {ours['steps']} steps, {ours['prefills']} prefills, "
      f"{ours['moves']} moves, {ours['compactions']} compactions", last])
  publish(figures, table, args.json)
  return 0


if __name__ == "__main__":
  print("run bench/annotate_throughput.py --lengths lognormal", file=sys.stderr)
  sys.exit(2)
