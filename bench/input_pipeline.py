"""Training input throughput and resume time: the uncached path vs the prepared caches, on the same records.

Everything runs in one process, on the CPU, through the trainer's own input (`input_pipeline.BatchIterator`, one
process, one data shard) on the stage-2 TeacherData mixture `teacherlm_stage2_personalization`:

  1. the records: `--records` TeacherData rows (id, task, question, answer, fundamentals, chain_of_thought,
     common_mistakes) written to a temporary `train.jsonl` by repeating the committed fixture
     `tests/fixtures/corpora/teacherdata_sorted/train.jsonl` (300 rows) with new unique ids; bound as
     `data_root.teacherdata_2m`. The vocabulary is the 512-token byte-level BPE fixture
     `tests/fixtures/tokenizer/tokenizer.json` (`vocabularies.HfTokenizerVocabulary`, bound as
     `task_vocabulary.vocabulary` in gin, as gin/models/*.gin do), or bytes with `--vocabulary bytes`;
  2. one-off costs: the uncached path's first-start scan (`source.num_input_examples('train')` after
     `sources.clear_scan_cache()`: every record is read and rendered once to count it) and the Beam preparation
     (`prepare.prepare`, DirectRunner in this process, or `--beam_workers N` multi-processing workers) into a
     temporary cache directory (bound as `cache_dirs.dirs`);
  3. throughput, uncached (`DataConfig(use_cached=False)`: read, render, tokenize, shuffle, pack, batch) and cached
     (`use_cached=True`: read the tokenized caches, shuffle, pack, batch), packing on, `--inputs_length` +
     `--targets_length` (1024 + 1024) rows, `--batch_size` rows a batch. The iterator repeats, as in training. After
     `--warmup_batches` (the first one fills the task's 10,000-example shuffle buffer: reported apart), the timed
     window is `--passes` (3) passes' worth of batches: until it has yielded passes x `--records` examples (or
     `--timed_batches`). Over a pass the shuffle buffer drains once and fills once, so every record is read,
     rendered and tokenized about once a pass in the window (a shorter window served from the full buffer would time
     packing alone). seqio's packing pulls examples in chunks of the row length (2,048 at the defaults), so the work
     done in a window can differ from its count by up to a chunk: up to about 10% for one pass of 20,000 examples
     (one-pass windows measured up to 10% above three-pass ones here), about 3% for three; the uncached column's
     "records rendered in the window" (the `tasks.sources` counter) shows the records it did render. Examples are
     counted with `input_pipeline.example_hashes`, tokens as the non-padding positions (`decoder_target_tokens !=
     0`: inputs and targets of the packed rows);
  4. resume at batch 10 and 10,000 (`--resume_positions`; `--resume_batch_size` 8 rows of `--resume_length` 256 =
     128 + 128, so that consuming 10,000 batches once is affordable), on the cached and the uncached path
     (`--no_resume_uncached` skips the latter): one uninterrupted iterator is saved (`BatchIterator.save`) at each
     position and its next batch kept; then, timed, (i) restore: `BatchIterator(config, N, restore_from=state)` and
     its first batch, (ii) replay: `BatchIterator(config, batches_consumed=N)` (skips N batches) and its first
     batch. Both first batches must equal the uninterrupted batch N + 1, or the script stops. Resumes run in this
     process, so they exclude the interpreter's start and imports, and the uncached path's scan is already cached
     (as the trainer's persisted scans make it on a restart).

Per core: the tables give the figures divided by `os.cpu_count()` (the machine's cores) and by the cores the process
actually kept busy in the timed window (its CPU seconds / wall seconds, from `os.times`, all its threads). Other
processes' load is measured from `/proc/stat` as in the other benchmarks, over each part timed (the scan, the
preparation when in this process, each throughput window, each path's resumes); the largest is reported, with a
warning above 0.1 cores.

  python bench/input_pipeline.py [--records 20000] [--vocabulary bpe|bytes] [--batch_size 8]
      [--inputs_length 1024 --targets_length 1024] [--passes 3] [--beam_workers 0 --num_shards 64]
      [--resume_positions 10,10000 --resume_batch_size 8 --resume_length 256] [--no_resume_uncached] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import types
from typing import Any, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import apache_beam as beam  # noqa: E402
import gin  # noqa: E402
import numpy as np  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402
import tokenizers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The machine helpers are shared with the other benchmarks, so all benchmarks measure alike.
from eval_throughput import wide_table  # noqa: E402
from forward_throughput import (background_cores, cpu_model, cpu_seconds, machine_line, markdown_table,  # noqa: E402
                                publish, run_environment, warn_if_busy)

import tasks  # noqa: E402
from tasks import sources  # noqa: E402
from teacherlm_jax import input_pipeline, prepare  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_ROWS = "tests/fixtures/corpora/teacherdata_sorted/train.jsonl"
TOKENIZER = "tests/fixtures/tokenizer/tokenizer.json"
MIXTURE = "teacherlm_stage2_personalization"
TASK = "teacherlm_teacherdata_2m"
PATHS = {"uncached": False, "cached": True}  # column name -> DataConfig.use_cached
COLUMNS = {"uncached": "uncached (use_cached=False)", "cached": "prepared caches (use_cached=True)"}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
  """The command-line flags (records, vocabulary, shapes, preparation, resume positions, output file)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--records", type=int, default=20_000, help="TeacherData rows generated from the fixture")
  parser.add_argument("--vocabulary", default="bpe", choices=("bpe", "bytes"),
                      help=f"bpe: the 512-token byte-level BPE fixture ({TOKENIZER}); bytes: seqio.ByteVocabulary")
  parser.add_argument("--inputs_length", type=int, default=1024)
  parser.add_argument("--targets_length", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=8, help="packed rows per batch (throughput)")
  parser.add_argument("--warmup_batches", type=int, default=3,
                      help="untimed batches first (the first one fills the shuffle buffer)")
  parser.add_argument("--passes", type=int, default=3,
                      help="the timed window: this many passes' worth of batches (until passes x --records examples "
                      "were yielded)")
  parser.add_argument("--timed_batches", type=int, default=0, help="timed batches instead (0: --passes decides)")
  parser.add_argument("--beam_workers", type=int, default=0,
                      help="Beam preparation: 0 = DirectRunner in this process; N = --direct_num_workers=N "
                      "--direct_running_mode=multi_processing")
  parser.add_argument("--num_shards", type=int, default=64, help="cache shard files (prepare's default)")
  parser.add_argument("--resume_positions", default="10,10000", help="comma-separated batch positions")
  parser.add_argument("--resume_batch_size", type=int, default=8)
  parser.add_argument("--resume_length", type=int, default=256, help="rows of half inputs, half targets")
  parser.add_argument("--no_resume_uncached", action="store_true", help="resume timings on the cached path only")
  parser.add_argument("--json", default=None, metavar="OUT", help="also write the figures to this JSON file")
  args = parser.parse_args(argv)
  args.positions = sorted({int(n) for n in args.resume_positions.split(",")})
  if min(args.records, args.batch_size, args.warmup_batches, args.passes, args.resume_batch_size,
         *args.positions) < 1:
    parser.error("--records, --batch_size, --warmup_batches, --passes, --resume_batch_size and positions must be "
                 ">= 1")
  if args.resume_length < 2 or args.resume_length % 2:
    parser.error("--resume_length must be even (half inputs, half targets)")
  return args


def write_records(directory: str, count: int) -> str:
  """`count` TeacherData rows (the fixture's, repeated, each with a new unique id) in directory/train.jsonl."""
  with open(os.path.join(REPO, FIXTURE_ROWS), encoding="utf-8") as handle:
    rows = [json.loads(line) for line in handle if line.strip()]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "train.jsonl"), "w", encoding="utf-8") as out:
    for i in range(count):
      out.write(json.dumps({**rows[i % len(rows)], "id": f"bench-{i}"}, ensure_ascii=False) + "\n")
  return directory


def configure(data_root: str, cache_dir: str, vocabulary: str) -> None:
  """Binds the data root, the cache directory and the vocabulary in gin, as the run's gin files would; as text, so
  that the Beam workers (which re-parse `gin.config_str()`) get the same configuration."""
  lines = ["from __gin__ import dynamic_registration", "from tasks import config as task_config",
           "from teacherlm_jax import vocabularies",
           f"task_config.data_root.teacherdata_2m = {data_root!r}", f"task_config.cache_dirs.dirs = [{cache_dir!r}]"]
  if vocabulary == "bpe":
    lines += ["task_config.task_vocabulary.vocabulary = @vocabularies.HfTokenizerVocabulary()",
              f"vocabularies.HfTokenizerVocabulary.tokenizer_path = {os.path.join(REPO, TOKENIZER)!r}"]
  else:
    lines += ["task_config.task_vocabulary.vocabulary = @vocabularies.byte_vocabulary()"]
  gin.clear_config()
  gin.parse_config("\n".join(lines))


def time_scan() -> dict[str, Any]:
  """The uncached path's first-start scan: counting the records after forgetting every cached scan."""
  sources.clear_scan_cache()
  rendered, before = sources.records_rendered(), cpu_seconds()
  examples = tasks.get_mixture_or_task(TASK).source.num_input_examples("train")
  after = cpu_seconds()
  seconds = after[0] - before[0]
  figures = {"seconds": seconds, "examples": examples, "records_rendered": sources.records_rendered() - rendered,
             "background_cores": background_cores(before, after)}
  print(f"scan: {examples:,} examples counted in {seconds:.2f} s ({figures['records_rendered']:,} records rendered)")
  return figures


def beam_options(workers: int) -> list[str]:
  options = ["--runner=DirectRunner"]
  if workers:
    options += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
  return options


def time_prepare(cache_dir: str, args: argparse.Namespace) -> dict[str, Any]:
  """The Beam preparation of the mixture's task into `cache_dir` (from scratch)."""
  options = beam_options(args.beam_workers)
  logging.getLogger("apache_beam").setLevel(logging.WARNING)  # as `python -m teacherlm_jax.prepare` does
  before = cpu_seconds()
  prepare.prepare([MIXTURE], cache_dir, ["train"], num_shards=args.num_shards, beam_options=options)
  after = cpu_seconds()
  seconds = after[0] - before[0]
  with open(os.path.join(cache_dir, TASK, "stats.train.json"), encoding="utf-8") as handle:
    stats = json.load(handle)
  print(f"prepare: {stats['examples']:,} examples into {args.num_shards} shards in {seconds:.1f} s "
        f"({' '.join(options)})")
  # With worker processes their CPU time would count as other processes' load: not measured then.
  return {"seconds": seconds, "examples": stats["examples"], "stats": stats, "num_shards": args.num_shards,
          "beam_options": options, "background_cores": None if args.beam_workers else background_cores(before, after)}


def data_config(use_cached: bool, inputs: int, targets: int, batch_size: int) -> input_pipeline.DataConfig:
  return input_pipeline.DataConfig(MIXTURE, {"inputs": inputs, "targets": targets}, batch_size=batch_size,
                                   use_cached=use_cached)


def iterator(config: input_pipeline.DataConfig, **kwargs: Any) -> input_pipeline.BatchIterator:
  """The trainer's iterator for this one process (repeating, shuffled)."""
  return input_pipeline.BatchIterator(config, process_index=0, process_count=1, **kwargs)


def throughput(config: input_pipeline.DataConfig, args: argparse.Namespace) -> dict[str, Any]:
  """Examples and non-padding tokens per second over the timed window (see the module docstring, step 3)."""
  start = time.perf_counter()
  batches = iterator(config)
  next(batches)
  first_batch_s = time.perf_counter() - start
  for _ in range(args.warmup_batches - 1):
    next(batches)
  count = {"batches": 0, "examples": 0, "tokens": 0, "loss_tokens": 0}
  window = args.passes * args.records
  rendered, before = sources.records_rendered(), cpu_seconds()
  while (count["batches"] < args.timed_batches) if args.timed_batches else (count["examples"] < window):
    batch = next(batches)
    count["batches"] += 1
    count["examples"] += len(input_pipeline.example_hashes(batch))
    count["tokens"] += int(np.count_nonzero(batch["decoder_target_tokens"]))
    count["loss_tokens"] += int(batch["decoder_loss_weights"].sum())
  after = cpu_seconds()
  count["records_rendered"] = sources.records_rendered() - rendered
  seconds, cpu_s = after[0] - before[0], after[2] - before[2]
  cores = os.cpu_count() or 1
  positions = count["batches"] * config.batch_size * sum(config.task_feature_lengths.values())
  figures = {**count, "seconds": seconds, "cpu_seconds": cpu_s, "cores_used": cpu_s / seconds,
             "examples_per_s": count["examples"] / seconds, "tokens_per_s": count["tokens"] / seconds,
             "examples_per_s_per_core": count["examples"] / seconds / cores,
             "tokens_per_s_per_core": count["tokens"] / seconds / cores,
             "examples_per_cpu_s": count["examples"] / cpu_s, "tokens_per_cpu_s": count["tokens"] / cpu_s,
             "tokens_per_example": count["tokens"] / count["examples"],
             "loss_tokens_per_example": count["loss_tokens"] / count["examples"],
             "row_fill": count["tokens"] / positions, "first_batch_s": first_batch_s,
             "background_cores": background_cores(before, after)}
  print(f"  {count['batches']} batches, {count['examples']:,} examples in {seconds:.2f} s: "
        f"{figures['examples_per_s']:,.0f} examples/s, {figures['tokens_per_s']:,.0f} tokens/s, "
        f"{figures['cores_used']:.2f} cores busy; first batch {first_batch_s:.2f} s")
  return figures


def check_window(uncached: dict[str, Any]) -> None:
  """Warns (stderr) when the uncached window rendered not about as many records as it counted examples."""
  if abs(uncached["records_rendered"] - uncached["examples"]) > 0.1 * uncached["examples"]:
    print(f"warning: the uncached window rendered {uncached['records_rendered']:,} records for the "
          f"{uncached['examples']:,} examples it counted (the shuffle buffer and the packing read ahead); raise "
          "--records or --passes for a rate of the whole pipeline", file=sys.stderr)


def check_same(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], what: str) -> None:
  """Stops unless two batches are identical, feature by feature."""
  if sorted(actual) != sorted(expected) or not all(np.array_equal(actual[k], expected[k]) for k in expected):
    raise AssertionError(f"{what}: the first batch is not the uninterrupted run's next batch")


def state_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))


def resume(config: input_pipeline.DataConfig, positions: list[int], directory: str) -> dict[str, Any]:
  """Per position N: the uninterrupted run saved at N and its batch N + 1; then restore and replay, timed."""
  reference, expected, figures, consumed_s = iterator(config), {}, {}, 0.0
  for n in positions:
    begin = time.perf_counter()
    while reference.batches_consumed < n:
      next(reference)
    consumed_s += time.perf_counter() - begin  # the saves and the kept batches are left out
    begin = time.perf_counter()
    reference.save(os.path.join(directory, f"state-{n}"))
    figures[n] = {"uninterrupted_s": consumed_s, "save_s": time.perf_counter() - begin,
                  "state_bytes": state_bytes(os.path.join(directory, f"state-{n}"))}
    expected[n] = next(reference)
  del reference
  for n in positions:
    begin = time.perf_counter()
    restored = iterator(config, batches_consumed=n, restore_from=os.path.join(directory, f"state-{n}"))
    check_same(next(restored), expected[n], f"restore at batch {n}")
    figures[n]["restore_s"] = time.perf_counter() - begin
    del restored
    begin = time.perf_counter()
    replayed = iterator(config, batches_consumed=n)
    check_same(next(replayed), expected[n], f"replay at batch {n}")
    figures[n]["replay_s"] = time.perf_counter() - begin
    del replayed
    print(f"  batch {n:,}: restore {figures[n]['restore_s']:.2f} s, replay {figures[n]['replay_s']:.2f} s "
          f"(uninterrupted {figures[n]['uninterrupted_s']:.1f} s; state {figures[n]['state_bytes'] / 1e6:.1f} MB); "
          "both first batches equal the uninterrupted batch")
  return figures


def ratios(figures: dict[str, Any], positions: list[int]) -> dict[str, Any]:
  """cached / uncached throughput; replay / restore at the last position; restore last / restore first."""
  through = figures["throughput"]
  out = {"cached_over_uncached_examples_per_s": through["cached"]["examples_per_s"]
         / through["uncached"]["examples_per_s"],
         "cached_over_uncached_examples_per_cpu_s": through["cached"]["examples_per_cpu_s"]
         / through["uncached"]["examples_per_cpu_s"]}
  first, last = positions[0], positions[-1]
  for path, resumes in figures["resume"].items():
    out[f"{path}_replay_over_restore_at_{last}"] = resumes[last]["replay_s"] / resumes[last]["restore_s"]
    out[f"{path}_restore_{last}_over_restore_{first}"] = resumes[last]["restore_s"] / resumes[first]["restore_s"]
  return out


def throughput_table(figures: dict[str, Any]) -> str:
  """Uncached and cached side by side: rates, per core, shapes, one-off costs and the ratio."""
  t, cores = figures["throughput"], figures["cores"]
  scan, prep = figures["scan"], figures["prepare"]

  def row(label: str, fmt: str, key: str) -> tuple[str, str, str]:
    return (label, *(fmt.format(t[name][key]) for name in PATHS))

  rows = [("", COLUMNS["uncached"], COLUMNS["cached"]),
          row("examples/s (= records/s)", "{:,.0f}", "examples_per_s"),
          row("tokens/s (non-padding)", "{:,.0f}", "tokens_per_s"),
          row(f"examples/s per core (/ os.cpu_count() = {cores})", "{:,.0f}", "examples_per_s_per_core"),
          row(f"tokens/s per core (/ {cores})", "{:,.0f}", "tokens_per_s_per_core"),
          row("cores the process kept busy (CPU s / wall s)", "{:.2f}", "cores_used"),
          row("examples per CPU second (per core actually used)", "{:,.0f}", "examples_per_cpu_s"),
          row("tokens per CPU second", "{:,.0f}", "tokens_per_cpu_s"),
          ("ratio cached / uncached (examples/s; per CPU s)", "1.00x",
           f"**{figures['ratios']['cached_over_uncached_examples_per_s']:.2f}x**; "
           f"{figures['ratios']['cached_over_uncached_examples_per_cpu_s']:.2f}x"),
          ("timed window", *(f"{t[n]['batches']} batches, {t[n]['examples']:,} examples, {t[n]['seconds']:.2f} s"
                             for n in PATHS)),
          row("records rendered in the window (tasks.sources counter)", "{:,}", "records_rendered"),
          row("first batch (builds the pipeline, fills the shuffle buffer), s", "{:.2f}", "first_batch_s"),
          ("one-off before the first start",
           f"scan {scan['seconds']:.2f} s ({scan['examples']:,} records)",
           f"Beam preparation {prep['seconds']:.1f} s ({prep['examples']:,} examples, {prep['num_shards']} shards)")]
  return markdown_table(rows)


def resume_table(figures: dict[str, Any], positions: list[int]) -> str:
  """Restore and replay at each position, per path, and the ratios."""
  columns = [(path, n) for path in figures["resume"] for n in positions]

  def row(label: str, cell) -> tuple[str, ...]:
    return (label, *(cell(figures["resume"][path][n]) for path, n in columns))

  rows = [("", *(f"{path}, batch {n:,}" for path, n in columns)),
          row("restore (saved iterator) + first batch, s", lambda f: f"{f['restore_s']:.2f}"),
          row("replay (skip N batches) + first batch, s", lambda f: f"{f['replay_s']:.2f}"),
          row("replay / restore", lambda f: f"{f['replay_s'] / f['restore_s']:.1f}x"),
          row("saved state (all files), MB", lambda f: f"{f['state_bytes'] / 1e6:.1f}"),
          row("save, s", lambda f: f"{f['save_s']:.2f}"),
          row("uninterrupted run to batch N, s", lambda f: f"{f['uninterrupted_s']:.1f}")]
  first, last = positions[0], positions[-1]
  summary = "; ".join(f"{path}: replay / restore at {last:,} "
                      f"{figures['ratios'][f'{path}_replay_over_restore_at_{last}']:.1f}x, restore at {last:,} / "
                      f"restore at {first:,} {figures['ratios'][f'{path}_restore_{last}_over_restore_{first}']:.2f}x"
                      for path in figures["resume"])
  return wide_table(rows) + "\n\n" + summary


def format_table(figures: dict[str, Any]) -> str:
  """The two tables and the setup."""
  c, r, t = figures["config"], figures["resume_config"], figures["throughput"]
  setup = (f"data: {figures['records']:,} TeacherData rows ({FIXTURE_ROWS} repeated, unique ids), mixture {MIXTURE}; "
           f"vocabulary {figures['vocabulary']}\n"
           f"throughput: packed rows of {c['inputs']} + {c['targets']} tokens, batch {c['batch_size']}, "
           f"{figures['warmup_batches']} warm-up batches, then {figures['window']}; tokens = "
           f"decoder_target_tokens != 0 (uncached {t['uncached']['tokens_per_example']:.1f} per example, cached "
           f"{t['cached']['tokens_per_example']:.1f}; rows {100 * t['cached']['row_fill']:.1f}% filled)\n"
           f"resume: rows of {r['inputs']} + {r['targets']} tokens, batch {r['batch_size']}; in this process (no "
           "interpreter start or imports; the uncached scan already cached)\n"
           + machine_line(figures))
  return (throughput_table(figures) + "\n\n" + resume_table(figures, figures["positions"]) + "\n\n" + setup)


def environment() -> dict[str, Any]:
  """`run_environment`'s versions and date, with the input pipeline's libraries in place of torch's."""
  absent = types.SimpleNamespace(__version__=None)
  env = run_environment(absent, absent, tensorflow=tf.__version__, seqio=seqio.__version__,
                        apache_beam=beam.__version__, tokenizers=tokenizers.__version__)
  for name in ("torch", "transformers"):
    del env["versions"][name]
  return env


def main(argv: Optional[list[str]] = None) -> int:
  args = parse_args(argv)
  cores = os.cpu_count() or 1
  with tempfile.TemporaryDirectory(prefix="input_pipeline_bench_") as work:
    data_root = write_records(os.path.join(work, "teacherdata"), args.records)
    cache_dir = os.path.join(work, "cache")
    configure(data_root, cache_dir, args.vocabulary)
    scan = time_scan()
    prepared = time_prepare(cache_dir, args)

    background = {"scan": scan["background_cores"], "prepare": prepared["background_cores"]}
    results = {}
    for name, use_cached in PATHS.items():
      print(f"throughput, {name}:")
      results[name] = throughput(data_config(use_cached, args.inputs_length, args.targets_length, args.batch_size),
                                 args)
      background[f"throughput_{name}"] = results[name]["background_cores"]

    half = args.resume_length // 2
    resumes = {}
    for name, use_cached in PATHS.items():
      if use_cached or not args.no_resume_uncached:
        print(f"resume, {name}:")
        before = cpu_seconds()
        resumes[name] = resume(data_config(use_cached, half, half, args.resume_batch_size), args.positions,
                               os.path.join(work, f"states-{name}"))
        background[f"resume_{name}"] = background_cores(before, cpu_seconds())
    resumes = {name: resumes[name] for name in ("cached", "uncached") if name in resumes}

  check_window(results["uncached"])
  known = [b for b in background.values() if b is not None]
  busy = max(known) if known else None
  warn_if_busy(busy, cores)
  figures = {
      "throughput": results, "resume": resumes, "scan": scan, "prepare": prepared,
      "records": args.records, "vocabulary": (f"HfTokenizerVocabulary({TOKENIZER}, 512 ids)"
                                              if args.vocabulary == "bpe" else "seqio.ByteVocabulary (259 ids)"),
      "config": {"inputs": args.inputs_length, "targets": args.targets_length, "batch_size": args.batch_size},
      "resume_config": {"inputs": half, "targets": half, "batch_size": args.resume_batch_size},
      "positions": args.positions, "warmup_batches": args.warmup_batches, "timed_batches": args.timed_batches,
      "passes": args.passes, "window": (f"{args.timed_batches} timed batches" if args.timed_batches else
                                        f"{args.passes} pass(es)' worth of batches timed"),
      "cpu": cpu_model(), "cores": cores, "background_cores": busy, "background_cores_per_part": background,
      **environment(),
  }
  figures["ratios"] = ratios(figures, args.positions)
  publish(figures, format_table(figures), args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
