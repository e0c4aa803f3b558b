"""Evaluation throughput: teacherlm-jax's rank classification vs one forward pass per (context, option) pair, as an
lm-evaluation-harness loglikelihood loop runs it with Hugging Face `transformers`.

All run in one process, on the same weights and the same examples, in float32 on the CPU:

  1. a random `BloomForCausalLM` is built from the flags (its weights perturbed so that biases and LayerNorms are
     not trivial) and saved with `save_pretrained` into a temporary directory; ours loads that directory as
     `evaluate.run` loads a Hugging Face checkpoint (`convert.load_hf`, params on a (1, -1, 1) mesh);
  2. the workload is real evaluation examples: the first `--num_examples` examples of each of `--tasks` (default
     `teacherlm_eval_ecqa` test: 100 questions, 5 options each), read by `evaluate.task_examples` and tokenized
     with the tokenizer fixture `tests/fixtures/tokenizer/tokenizer.json` (512 ids, below any vocab size >= 512);
  3. ours is the evaluation path itself: `evaluate.score_examples` with `evaluate.jit_score(model, mesh)` inside
     `partitioning.activation_rules`, `--batch_size` contexts per call: each context is encoded once (a prefill of
     left-padded contexts, padded to bucket lengths, with logits of the last position only) and all its options
     are scored from it;
  4. the peer is the harness's `HFLM._loglikelihood_tokens` loop with `logits_cache=False`: every (context, option)
     pair is one request (context and option tokenized separately, concatenated, the last token dropped), requests
     are sorted longest first and batched `--peer_batch_size` at a time, right-padded to the longest in the batch,
     one full forward of `BloomForCausalLM` (`model(input_ids).logits`, every position) under
     `torch.inference_mode()`, `log_softmax` over all of it, and the option's log-likelihood is the sum at its
     positions. A third column runs the same loop with the harness's default `logits_cache=True` (requests that
     share context + option[:-1], i.e. the one-token options of one question, are run once); with `--ours_per_pair`
     a fourth runs our model jitted on the same per-pair batches (padded up to a multiple of 16 to bound
     compilations), which splits the gain into algorithm (ours vs ours per pair) and framework (ours per pair vs
     transformers);
  5. a check before timing: on the first `--check_examples` examples of each task every option's log-likelihood of
     every column must agree with the per-pair peer's within `--atol`;
  6. warm-up (ours: one untimed run over the whole workload, which compiles it; ours per pair: one batch of each
     padded length), reported separately; then `--repeats` timed runs of each over the whole workload
     (tokenization included on every side), taking turns. Scored options/s = options / median seconds. The scores
     of the last timed runs are compared once more, over every option.

torch uses as many intra-op threads as the machine has cores (`torch.set_num_threads`); XLA's CPU backend uses
every core by default.

  python bench/eval_throughput.py [--hidden_size 512 --num_layers 8 --num_heads 8 --vocab_size 32000]
      [--tasks teacherlm_eval_ecqa[,teacherlm_eval_mmlu] --num_examples N] [--batch_size 32 --peer_batch_size 8]
      [--repeats 3] [--ours_per_pair] [--json OUT]

torch and transformers are needed only here: `pip install torch==2.13.0 transformers`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The machine, model and timing helpers are shared with the forward benchmark, so all benchmarks measure alike.
from forward_throughput import (background_cores, build_models, cpu_model, cpu_seconds, import_torch,  # noqa: E402
                                machine_line, markdown_table, model_parser, publish, run_environment,
                                time_interleaved, torch_on_all_cores, warn_if_busy)

from teacherlm_jax import decoding, evaluate, partitioning, vocabularies  # noqa: E402
from teacherlm_jax.models import bloom, common# noqa: E402

TARGET_RATIO = 5.0  # the evaluation issue's target: at least 5x the scored options/s of one forward per pair
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = "tests/fixtures/tokenizer/tokenizer.json"
PAIR_PAD = 16  # ours per pair: padded lengths rounded up to a multiple of this, to bound the number of compilations
COLUMNS = {  # name in the figures -> column header
    "teacherlm_jax": "teacherlm-jax (evaluate.score_examples)",
    "teacherlm_jax_per_pair": "teacherlm-jax, one forward per pair",
    "transformers": "transformers, one forward per pair (harness loop, logits_cache=False)",
    "transformers_logits_cache": "transformers, harness loop, logits_cache=True",
}

Workload = list[tuple[str, list[evaluate.EvalExample]]]  # (task, examples)
Scores = dict[str, list[np.ndarray]]  # task -> each example's option log-likelihoods
Request = tuple[tuple[str, int, int], list[int], list[int]]  # ((task, example, option), context ids, option ids)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
  """The command-line flags (model size, tasks, batch sizes, repeats, tolerance, output file)."""
  parser = model_parser(__doc__)
  parser.add_argument("--tasks", default="teacherlm_eval_ecqa",
                      help="comma-separated evaluation tasks whose examples are scored (e.g. "
                      "teacherlm_eval_ecqa,teacherlm_eval_mmlu)")
  parser.add_argument("--split", default=None, help="the tasks' split (default: evaluate.default_split, i.e. test)")
  parser.add_argument("--num_examples", type=int, default=None, help="the first N examples of each task (default all)")
  parser.add_argument("--batch_size", type=int, default=32, help="ours: contexts per call (evaluate's batch_size)")
  parser.add_argument("--peer_batch_size", type=int, default=8,
                      help="the per-pair loops: requests per forward (the harness's --batch_size; 8 was the peer's "
                      "fastest of 8, 16 and 32 on the measured machine)")
  parser.add_argument("--max_length", type=int, default=2048, help="longest context, in tokens (evaluate's max_length)")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs of each over the whole workload")
  parser.add_argument("--ours_per_pair", action="store_true",
                      help="add a column: our model run on the per-pair loop's batches (one forward per pair), which "
                      "splits the gain into algorithm and framework; adds about 4 minutes at the defaults on 2 cores")
  parser.add_argument("--check_examples", type=int, default=4,
                      help="examples of each task whose option log-likelihoods are compared before timing")
  parser.add_argument("--atol", type=float, default=1e-3, help="largest allowed difference of a log-likelihood")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, metavar="OUT", help="also write the figures to this JSON file")
  args = parser.parse_args(argv)
  if min(args.batch_size, args.peer_batch_size, args.repeats, args.check_examples) < 1:
    parser.error("--batch_size, --peer_batch_size, --repeats and --check_examples must be at least 1")
  return args


def load_workload(args: argparse.Namespace) -> Workload:
  """The first `--num_examples` examples of each of `--tasks`, as `evaluate.task_examples` reads them."""
  workload = []
  for task in args.tasks.split(","):
    examples = evaluate.task_examples(task, args.split or evaluate.default_split(task))[:args.num_examples]
    if not examples:
      sys.exit(f"error: {task} has no examples")
    workload.append((task, examples))
  return workload


def encode_requests(workload: Workload, vocabulary: Any) -> list[Request]:
  """One request per (context, option) pair, context and option tokenized separately (as `score_examples`)."""
  requests = []
  for task, examples in workload:
    for i, example in enumerate(examples):
      context = vocabulary.encode(example.context)
      for k, option in enumerate(example.options):
        requests.append(((task, i, k), context, vocabulary.encode(option)))
  return requests


def harness_batches(requests: list[Request], batch_size: int, max_length: int, logits_cache: bool
                    ) -> list[list[tuple[list[int], list[Request]]]]:
  """The harness's batching: [[(model input, the requests it answers)] of at most `batch_size` inputs].

  The input of a request is (context + option)[-(max_length + 1):][:-1]; inputs are sorted by their context + option,
  longest first (ties by the tokens), as `HFLM._loglikelihood_tokens` orders them. With `logits_cache`, requests sharing
  context + option[:-1] (for one-token options: the same context) share one input, as the harness's
  `Collator(group_by="contexts")` does.
  """
  groups: dict[Any, list[Request]] = {}
  for request in requests:
    key = tuple(request[1] + request[2][:-1]) if logits_cache else request[0]
    groups.setdefault(key, []).append(request)
  full = [(group[0][1] + group[0][2], group) for group in groups.values()]  # context + option of each input
  full.sort(key=lambda item: (-len(item[0]), tuple(item[0])))
  inputs = [(tokens[-(max_length + 1):][:-1], group) for tokens, group in full]
  return [inputs[start:start + batch_size] for start in range(0, len(inputs), batch_size)]


def to_scores(workload: Workload, flat: dict[tuple[str, int, int], float]) -> Scores:
  """Per-request scores -> each example's option log-likelihoods, in the workload's order."""
  return {task: [np.asarray([flat[(task, i, k)] for k in range(len(example.options))], np.float32)
                 for i, example in enumerate(examples)] for task, examples in workload}


def harness_loop(torch: Any, hf_model: Any, vocabulary: Any, batch_size: int, max_length: int, logits_cache: bool
                 ) -> Callable[[Workload], Scores]:
  """The harness's `loglikelihood` with `transformers`: tokenize the pairs, then per batch one forward of every
  right-padded input (`model(input_ids).logits`, no attention mask, as `HFLM._model_call`), `log_softmax` over all
  positions, and per request the sum at its option's positions (plus the harness's greedy exact-match check)."""

  def run(workload: Workload) -> Scores:
    flat = {}
    for chunk in harness_batches(encode_requests(workload, vocabulary), batch_size, max_length, logits_cache):
      width = max(len(ids) for ids, _ in chunk)
      batch = torch.zeros((len(chunk), width), dtype=torch.long)
      for row, (ids, _) in enumerate(chunk):
        batch[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
      with torch.inference_mode():
        log_probs = torch.nn.functional.log_softmax(hf_model(batch).logits, dim=-1)
        for (ids, group), row_log_probs in zip(chunk, log_probs):
          for key, _, option in group:
            option_log_probs = row_log_probs[len(ids) - len(option):len(ids)]
            option_ids = torch.tensor(option, dtype=torch.long)
            bool((option_log_probs.argmax(dim=-1) == option_ids).all())  # the harness's is-greedy flag
            flat[key] = float(option_log_probs.gather(1, option_ids[:, None]).sum())
    return to_scores(workload, flat)

  return run


def ours_per_pair(model: bloom.Bloom, params: Any, vocabulary: Any, batch_size: int, max_length: int
                  ) -> tuple[Callable[[Workload], Scores], Callable[[Workload], None]]:
  """(run, warm-up) of our model on the harness's per-pair batches: one jitted full forward (logits at every
  position, log_softmax, the options' log-probabilities summed on device) per batch, rows right-padded to a multiple
  of `PAIR_PAD` tokens and to `batch_size` rows (filler rows dropped). The warm-up runs one batch of each padded
  length, which compiles every shape a run needs."""

  def score_rows(params, tokens, mask, targets, weights):
    logits = model.apply({"params": params}, tokens, mask)
    log_probs = jax.nn.log_softmax(logits.astype(jax.numpy.float32), axis=-1)
    picked = jax.numpy.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return (picked * weights).sum(axis=-1)

  forward = jax.jit(score_rows)

  def run_batches(workload: Workload, first_of_each_width: bool) -> dict[tuple[str, int, int], float]:
    flat, widths = {}, set()
    for chunk in harness_batches(encode_requests(workload, vocabulary), batch_size, max_length, False):
      width = -(-max(len(ids) for ids, _ in chunk) // PAIR_PAD) * PAIR_PAD
      if first_of_each_width and width in widths:
        continue
      widths.add(width)
      tokens, mask, targets, weights = (np.zeros((batch_size, width), np.int32) for _ in range(4))
      for row, (ids, [(_, _, option)]) in enumerate(chunk):
        tokens[row, :len(ids)], mask[row, :len(ids)] = ids, 1
        targets[row, len(ids) - len(option):len(ids)] = option  # position t predicts token t + 1
        weights[row, len(ids) - len(option):len(ids)] = 1
      scores = np.asarray(forward(params, tokens, mask, targets, weights))
      for row, (_, [(key, _, _)]) in enumerate(chunk):
        flat[key] = float(scores[row])
    return flat

  def run(workload: Workload) -> Scores:
    return to_scores(workload, run_batches(workload, False))

  def warm_up(workload: Workload) -> None:
    run_batches(workload, True)

  return run, warm_up


def ours_eval(model: bloom.Bloom, params: Any, mesh: Any, vocabulary: Any, batch_size: int, max_length: int
              ) -> Callable[[Workload], Scores]:
  """The evaluation path: `evaluate.score_examples` per task over `evaluate.jit_score(model, mesh)`, inside
  `partitioning.activation_rules`, as `evaluate.run` calls it."""
  score = evaluate.jit_score(model, mesh)

  def run(workload: Workload) -> Scores:
    with partitioning.activation_rules(mesh):
      return {task: evaluate.score_examples(examples, lambda *a: score(params, *a), vocabulary, batch_size,
                                            max_length, desc=task) for task, examples in workload}

  return run


def max_diff(a: Scores, b: Scores) -> float:
  return max(float(np.max(np.abs(x - y))) for task in a for x, y in zip(a[task], b[task]))


def agreement(a: Scores, b: Scores) -> float:
  """Fraction of examples whose highest-scoring option is the same under both."""
  same = [int(np.argmax(x)) == int(np.argmax(y)) for task in a for x, y in zip(a[task], b[task])]
  return sum(same) / len(same)


def work_figures(workload: Workload, vocabulary: Any, args: argparse.Namespace) -> dict[str, dict[str, int]]:
  """Per column: model calls per run, token positions run through the layers (padding included) and positions run
  through the LM head."""
  requests = encode_requests(workload, vocabulary)
  ours = {"calls": 0, "positions": 0, "lm_head_positions": 0}
  for task, examples in workload:
    plan = decoding.plan_batches([min(len(vocabulary.encode(e.context)), args.max_length) for e in examples],
                                 args.batch_size, args.max_length)
    option_length = max(len(option) for key, _, option in requests if key[0] == task)
    num_options = max(len(e.options) for e in examples)
    for _, length in plan:  # filler rows included; options of more than one token take a second call
      ours["calls"] += 1 if option_length == 1 else 2
      ours["positions"] += args.batch_size * (length + num_options * (option_length - 1))
      ours["lm_head_positions"] += args.batch_size * (1 + num_options * (option_length - 1))
  figures = {"teacherlm_jax": ours}
  for name, cache in (("transformers", False), ("transformers_logits_cache", True)):
    chunks = harness_batches(requests, args.peer_batch_size, args.max_length, cache)
    positions = sum(len(chunk) * max(len(ids) for ids, _ in chunk) for chunk in chunks)
    figures[name] = {"calls": len(chunks), "positions": positions, "lm_head_positions": positions}
  chunks = harness_batches(requests, args.peer_batch_size, args.max_length, False)
  positions = sum(args.peer_batch_size * -(-max(len(ids) for ids, _ in chunk) // PAIR_PAD) * PAIR_PAD
                  for chunk in chunks)
  figures["teacherlm_jax_per_pair"] = {"calls": len(chunks), "positions": positions, "lm_head_positions": positions}
  return figures


def wide_table(rows: list[tuple[str, ...]]) -> str:
  """`markdown_table` for any number of columns (its delimiter row is written for three)."""
  lines = markdown_table(rows).split("\n")
  lines[1] = "|" + " --- |" * len(rows[0])
  return "\n".join(lines)


def format_table(figures: dict[str, Any]) -> str:
  """The side-by-side results and the setup, as a Markdown table."""
  names = [name for name in COLUMNS if name in figures]
  cols = [figures[name] for name in names]
  work = figures["work"]

  def row(label: str, cell: Callable[[str, dict], str]) -> tuple[str, ...]:
    return (label, *(cell(name, col) for name, col in zip(names, cols)))

  def ratio_cell(name: str, col: dict) -> str:
    if name == "transformers":
      return "1.00x"
    ratio = col["options_per_s"] / figures["transformers"]["options_per_s"]
    if name == "teacherlm_jax":
      reached = "reached" if figures["target_reached"] else "NOT reached"
      return f"**{ratio:.2f}x** (target {TARGET_RATIO:.0f}x: {reached})"
    return f"{ratio:.2f}x"

  rows = [("", *(COLUMNS[name] for name in names)),
          row("scored options/s (median)", lambda n, c: f"{c['options_per_s']:,.1f}"),
          row("examples/s (median)", lambda n, c: f"{c['examples_per_s']:,.2f}"),
          row("s / run (median)", lambda n, c: f"{c['median_s']:.3f}"),
          row("s / run (min .. max)", lambda n, c: f"{min(c['seconds']):.3f} .. {max(c['seconds']):.3f}"),
          row("ratio options/s vs one forward per pair (transformers)", ratio_cell),
          row("ratio ours / this column", lambda n, c: f"{cols[0]['options_per_s'] / c['options_per_s']:.2f}x"),
          row("model calls / run", lambda n, c: f"{work[n]['calls']}"),
          row("token positions through the layers / run (padding included)",
              lambda n, c: f"{work[n]['positions']:,}"),
          row("positions through the LM head / run", lambda n, c: f"{work[n]['lm_head_positions']:,}"),
          row("warm-up, not timed", lambda n, c: c["warmup"]),
          row("version", lambda n, c: (f"jax {figures['versions']['jax']}, flax {figures['versions']['flax']}"
                                       if n.startswith("teacherlm") else
                                       f"torch {figures['versions']['torch']}, transformers "
                                       f"{figures['versions']['transformers']}")),
          row("threads", lambda n, c: ("XLA CPU default (all cores)" if n.startswith("teacherlm") else
                                       f"torch.set_num_threads({figures['torch_threads']})"))]
  config, load = figures["config"], figures["workload"]
  tasks = "; ".join(f"{t['task']} {t['split']}: {t['examples']} examples x {t['options']} options, contexts "
                    f"{t['min_tokens']} .. {t['max_tokens']} tokens (mean {t['mean_tokens']:.1f})" for t in load)
  setup = (f"config: hidden {config['hidden_size']}, layers {config['num_layers']}, heads {config['num_heads']}, "
           f"vocab {config['vocab_size']}; {figures['num_params']:,} parameters; float32\n"
           f"workload: {tasks}; {figures['options']} scored options per run; tokenizer fixture ({TOKENIZER})\n"
           f"batches: ours {figures['batch_size']} contexts per call (padded to bucket lengths), per-pair loops "
           f"{figures['peer_batch_size']} requests per forward; {figures['repeats']} timed runs each\n"
           f"check before timing ({figures['check']['examples']} examples, {figures['check']['options']} options): "
           f"max abs diff vs the per-pair peer {figures['check']['max_abs_diff']:.2e} (atol {figures['atol']}); "
           f"all {figures['options']} options of the timed runs: ours {figures['final_max_abs_diff']:.2e}, same "
           f"prediction on {100 * figures['prediction_agreement']:.0f}% of the examples\n"
           + machine_line(figures))
  return wide_table(rows) + "\n\n" + setup


def main(argv: Optional[list[str]] = None) -> int:
  args = parse_args(argv)
  torch, transformers = import_torch()

  cores = torch_on_all_cores(torch)

  vocabulary = vocabularies.HfTokenizerVocabulary(os.path.join(REPO, TOKENIZER))
  workload = load_workload(args)
  largest = max(max(ids) for _, context, option in encode_requests(workload, vocabulary) for ids in (context, option))
  if largest >= args.vocab_size:
    sys.exit(f"error: the tokenizer gives ids up to {largest}, not below --vocab_size {args.vocab_size}")
  options = sum(len(e.options) for _, examples in workload for e in examples)
  examples = sum(len(examples) for _, examples in workload)
  load = []
  for task, task_examples in workload:
    lengths = [len(vocabulary.encode(e.context)) for e in task_examples]
    load.append({"task": task, "split": args.split or evaluate.default_split(task), "examples": len(task_examples),
                 "options": max(len(e.options) for e in task_examples), "min_tokens": min(lengths),
                 "max_tokens": max(lengths), "mean_tokens": statistics.mean(lengths)})
    print(f"{task}: {len(task_examples)} examples, contexts {min(lengths)} .. {max(lengths)} tokens")
  work = work_figures(workload, vocabulary, args)

  mesh = partitioning.make_mesh(1, -1, 1)
  hf_model, model, params = build_models(args, torch, transformers, mesh=mesh, dtype="float32")
  runs = {"teacherlm_jax": ours_eval(model, params, mesh, vocabulary, args.batch_size, args.max_length)}
  warm_ups = {"teacherlm_jax": (runs["teacherlm_jax"], "a run over the workload")}
  if args.ours_per_pair:
    runs["teacherlm_jax_per_pair"], warm_up = ours_per_pair(model, params, vocabulary, args.peer_batch_size,
                                                            args.max_length)
    warm_ups["teacherlm_jax_per_pair"] = (warm_up, "a batch of each padded length")
  runs["transformers"] = harness_loop(torch, hf_model, vocabulary, args.peer_batch_size, args.max_length, False)
  runs["transformers_logits_cache"] = harness_loop(torch, hf_model, vocabulary, args.peer_batch_size,
                                                   args.max_length, True)

  # The check, on the first examples of each task (it also warms the peers up).
  subset = [(task, task_examples[:args.check_examples]) for task, task_examples in workload]
  check_scores, check_s = {}, {}
  for name, run in runs.items():
    start = time.perf_counter()
    check_scores[name] = run(subset)
    check_s[name] = time.perf_counter() - start
  diffs = {name: max_diff(scores, check_scores["transformers"]) for name, scores in check_scores.items()}
  check_options = sum(len(e.options) for _, task_examples in subset for e in task_examples)
  for task, task_examples in subset:
    for i in range(min(2, len(task_examples))):
      print(f"  {task} #{i}: ours {np.round(check_scores['teacherlm_jax'][task][i], 4).tolist()} "
            f"HF {np.round(check_scores['transformers'][task][i], 4).tolist()}")
  print(f"check on {check_options} options: max abs diff vs the per-pair peer "
        + ", ".join(f"{name} {diff:.2e}" for name, diff in diffs.items()) + f" (atol {args.atol})")
  if not max(diffs.values()) <= args.atol:
    print(f"error: option log-likelihoods differ by {max(diffs.values()):.3e} > {args.atol}; not timing",
          file=sys.stderr)
    return 1

  # Warm-up: ours once over the whole workload, ours per pair once per padded length (both compile every shape
  # they meet); the check above was the peers' warm-up.
  warmup = {name: f"check run on {check_options} options {check_s[name]:.1f} s" for name in runs}
  warmup_s = {}
  for name, (warm, what) in warm_ups.items():
    start = time.perf_counter()
    warm(workload)
    warmup_s[name] = time.perf_counter() - start
    warmup[name] += f"; {what} (compiles) {warmup_s[name]:.1f} s"
  print("warm-up: " + "; ".join(f"{name}: {text}" for name, text in warmup.items()))

  last: dict[str, Scores] = {}

  def timed(name: str) -> Callable[[], None]:
    def call() -> None:
      last[name] = runs[name](workload)
    return call

  before = cpu_seconds()
  timing = time_interleaved({name: timed(name) for name in runs}, args.repeats)
  background = background_cores(before, cpu_seconds())
  warn_if_busy(background, cores)

  results = {}
  for name, seconds in timing.items():
    median = statistics.median(seconds)
    results[name] = {"seconds": seconds, "median_s": median, "options_per_s": options / median,
                     "examples_per_s": examples / median, "warmup": warmup[name],
                     "check_max_abs_diff": diffs[name]}
    print(f"{name}: median {median:.3f} s over {args.repeats} runs ({options / median:,.1f} options/s)")
  final = {name: max_diff(scores, last["transformers"]) for name, scores in last.items()}
  ratio = results["teacherlm_jax"]["options_per_s"] / results["transformers"]["options_per_s"]
  figures = {
      **results,
      "ratio": ratio, "target_ratio": TARGET_RATIO, "target_reached": ratio >= TARGET_RATIO,
      "ratios_vs_per_pair_peer": {name: r["options_per_s"] / results["transformers"]["options_per_s"]
                                  for name, r in results.items()},
      "config": {"hidden_size": args.hidden_size, "num_layers": args.num_layers, "num_heads": args.num_heads,
                 "vocab_size": args.vocab_size, "dtype": "float32"},
      "workload": load, "options": options, "examples": examples, "work": work, "tokenizer": TOKENIZER,
      "batch_size": args.batch_size, "peer_batch_size": args.peer_batch_size, "max_length": args.max_length,
      "pair_pad": PAIR_PAD, "repeats": args.repeats, "atol": args.atol,
      "check": {"examples": sum(len(e) for _, e in subset), "options": check_options,
                "max_abs_diff": max(diffs.values()), "per_column": diffs},
      "final_max_abs_diff": final["teacherlm_jax"], "final_max_abs_diff_per_column": final,
      "prediction_agreement": agreement(last["teacherlm_jax"], last["transformers"]),
      "warmup_s": warmup_s, "check_s": check_s,
      "num_params": common.count_params(params), "mesh": dict(mesh.shape), "torch_threads": torch.get_num_threads(),
      "cpu": cpu_model(), "cores": cores, "background_cores": background,
      **run_environment(torch, transformers),
  }
  publish(figures, format_table(figures), args.json)
  if not max(final.values()) <= args.atol:
    print(f"error: over all options of the timed runs, log-likelihoods differ by up to {max(final.values()):.3e} > "
          f"{args.atol}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
