"""Learning-by-teaching exam throughput: exam prompts scored per second when every worked example is encoded once and
its exam questions are scored over its KV cache (`evaluate.score_shared_examples`), against our own path that
encodes every exam prompt (worked example + question) from scratch (`evaluate.score_examples`).

Both sides run in one process, on the same weights, the same prompts and the same token ids, in float32 on the CPU:

  1. the model is a random BLOOM of the flags' size (41.6M parameters by default, as the other benchmarks), every
     parameter perturbed so that biases and LayerNorms are not trivial, created sharded on a (1, -1, 1) mesh; no
     torch (both sides are ours);
  2. the workload is real text tokenized with the tokenizer fixture `tests/fixtures/tokenizer/tokenizer.json`:
     `--num_candidates` worked examples (the prefixes), ECQA test questions with their answer and explanation
     (`Q: ... A: The answer is (C). {explanation}`), those closest to `--prefix_tokens` tokens; each followed by an
     exam of `--exam_size` questions (`" " + rendering.eval_context(question)`, as `lbt.exam_examples` renders them)
     of `--exam` (CREAK dev: options A, B; or ECQA test: A .. E), those closest to `--question_tokens` tokens, a
     different exam per candidate;
  3. ours: `evaluate.score_shared_examples(prefixes, exams, scorer, vocabulary, batch_size, max_length)` over
     `evaluate.jit_score_shared(model, mesh)`: a prefill of each batch of prefixes, the cache rows repeated once per
     question, the questions scored over it;
  4. the peer: `evaluate.score_examples` over `evaluate.jit_score(model, mesh)` on every prefix + question as one
     context (each encoded from scratch), the same `--batch_size` exam prompts per call;
  5. a check: the first run of each over the whole workload (which compiles every shape it meets; reported as the
     warm-up, not timed) must give every option's log-likelihood within `--atol` of the other side's, on prompts
     whose concatenation tokenizes to prefix + question ids (the script stops otherwise);
  6. `--repeats` timed runs of each over the whole workload (tokenization included), taking turns; exam prompts
     scored/s = prompts / median seconds, and the ratio ours / peer. Other processes' CPU use while timing is
     measured from /proc/stat and reported (a warning above 0.1 cores).

XLA's CPU backend uses every core by default.

  python bench/lbt_throughput.py [--hidden_size 512 --num_layers 8 --num_heads 8 --vocab_size 32000]
      [--num_candidates 16 --exam_size 8 --exam creak|ecqa --prefix_tokens 200 --question_tokens 60]
      [--batch_size 32 --max_length 2048] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The machine and timing helpers are shared with the other benchmarks, so all benchmarks measure alike.
from forward_throughput import (background_cores, cpu_model, cpu_seconds, machine_line, markdown_table,  # noqa: E402
                                model_parser, publish, time_interleaved, warn_if_busy)

from tasks import rendering  # noqa: E402
from teacherlm_jax import evaluate, partitioning, vocabularies  # noqa: E402
from teacherlm_jax.models import bloom, common  # noqa: E402

TARGET_RATIO = 2.5  # the issue's target: at least 2.5x the exam prompts/s of one encoding per exam prompt
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = "tests/fixtures/tokenizer/tokenizer.json"
COLUMNS = {"shared": "teacherlm-jax, prefix encoded once (evaluate.score_shared_examples)",
           "per_prompt": "teacherlm-jax, every exam prompt encoded (evaluate.score_examples)"}

Workload = tuple[list[str], list[list[evaluate.EvalExample]]]  # (prefixes, exams[i] after prefixes[i])
Scores = list[list[np.ndarray]]  # [candidate][question] -> option log-likelihoods


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
  """The command-line flags (model size, workload, batch size, repeats, tolerance, output file)."""
  parser = model_parser(__doc__)
  parser.add_argument("--num_candidates", type=int, default=16, help="worked examples (prefixes)")
  parser.add_argument("--exam_size", type=int, default=8, help="exam questions after each worked example (E)")
  parser.add_argument("--exam", choices=("creak", "ecqa"), default="creak",
                      help="the exam questions: CREAK dev (options A, B) or ECQA test (A .. E)")
  parser.add_argument("--prefix_tokens", type=int, default=200,
                      help="worked examples are the ECQA ones whose length is closest to this")
  parser.add_argument("--question_tokens", type=int, default=60,
                      help="exam questions are those whose length is closest to this")
  parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(REPO), "shared", "datasets"),
                      help="where ecqa_test.jsonl and creak_dev.jsonl are")
  parser.add_argument("--batch_size", type=int, default=32, help="exam prompts per call, both sides")
  parser.add_argument("--max_length", type=int, default=2048, help="longest exam prompt, in tokens")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs of each over the whole workload")
  parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed difference of a log-likelihood")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, metavar="OUT", help="also write the figures to this JSON file")
  args = parser.parse_args(argv)
  if min(args.num_candidates, args.exam_size, args.batch_size, args.repeats) < 1:
    parser.error("--num_candidates, --exam_size, --batch_size and --repeats must be at least 1")
  return args


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    sys.exit(f"error: {path} does not exist; pass --data_dir, the directory with ecqa_test.jsonl and creak_dev.jsonl")
  with open(path, encoding="utf-8") as lines:
    return [json.loads(line) for line in lines if line.strip()]


def closest(texts: list[str], lengths: list[int], target: int, count: int, what: str) -> list[int]:
  """Indices (in order) of the `count` texts whose lengths are closest to `target` (ties by index)."""
  if len(texts) < count:
    sys.exit(f"error: {count} {what} asked for, only {len(texts)} available; ask for fewer")
  return sorted(sorted(range(len(texts)), key=lambda i: (abs(lengths[i] - target), i))[:count])


def ecqa_letter(row: dict) -> str:
  return "ABCDE"[[row[f"q_op{k}"] for k in range(1, 6)].index(row["q_ans"])]


def load_workload(args: argparse.Namespace, vocabulary: Any) -> Workload:
  """The worked examples and their exams (see the module docstring)."""
  ecqa = read_jsonl(os.path.join(args.data_dir, "ecqa_test.jsonl"))
  teaching = [f"{row['test']}{ecqa_letter(row)}). {row['taskB']}" for row in ecqa]
  lengths = [len(vocabularies.encode_prompt(vocabulary, text)) for text in teaching]
  prefixes = [teaching[i] for i in closest(teaching, lengths, args.prefix_tokens, args.num_candidates,
                                           "worked examples")]
  if args.exam == "creak":
    rows = read_jsonl(os.path.join(args.data_dir, "creak_dev.jsonl"))
    questions = [(" " + rendering.eval_context(row["question"]), ("A", "B"), "AB".index(row["answer"][1]))
                 for row in rows]
  else:
    questions = [(" " + row["test"], tuple("ABCDE"), "ABCDE".index(ecqa_letter(row))) for row in ecqa]
  lengths = [len(vocabulary.encode(context)) for context, _, _ in questions]
  count = args.num_candidates * args.exam_size
  chosen = [questions[i] for i in closest([q[0] for q in questions], lengths, args.question_tokens, count,
                                          f"{args.exam} exam questions")]
  exams = [[evaluate.EvalExample(context, options, target, f"{i}-{j}")
            for j, (context, options, target) in enumerate(chosen[i * args.exam_size:(i + 1) * args.exam_size])]
           for i in range(args.num_candidates)]
  return prefixes, exams


def whole_prompts(workload: Workload) -> list[evaluate.EvalExample]:
  """Every exam prompt as one context (prefix + question), candidate by candidate."""
  prefixes, exams = workload
  return [evaluate.EvalExample(prefix + e.context, e.options, e.target, e.example_id)
          for prefix, exam in zip(prefixes, exams) for e in exam]


def same_ids(workload: Workload, vocabulary: Any) -> int:
  """How many exam prompts tokenize as their prefix's ids + their question's ids (both sides then score the same
  tokens)."""
  prefixes, exams = workload
  return sum(vocabularies.encode_prompt(vocabulary, prefix + e.context)
             == vocabularies.encode_prompt(vocabulary, prefix) + list(vocabulary.encode(e.context))
             for prefix, exam in zip(prefixes, exams) for e in exam)


def random_model(args: argparse.Namespace, mesh: Any) -> tuple[bloom.Bloom, Any]:
  """A random float32 BLOOM of the flags' size, params created sharded on the mesh, every one perturbed by
  0.02 * N(0, 1) (LayerNorm scales 1 and biases 0 otherwise)."""
  config = bloom.BloomConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
                             num_heads=args.num_heads)
  model = bloom.Bloom(config)
  params = partitioning.init_sharded(lambda key: common.init_params(model, key), jax.random.key(args.seed), mesh)
  leaves, tree = jax.tree.flatten(params)

  def perturb(leaves, key):
    keys = jax.random.split(key, len(leaves))
    return [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]

  shardings = [leaf.sharding for leaf in leaves]
  leaves = jax.jit(perturb, out_shardings=shardings)(leaves, jax.random.key(args.seed + 1))
  return model, jax.tree.unflatten(tree, leaves)


def recording(score: Callable[..., np.ndarray], params: Any, calls: list[tuple[tuple[int, ...], ...]]
              ) -> Callable[..., np.ndarray]:
  """`score(params, *arrays)`, the shapes of every call's arrays appended to `calls`."""
  def call(*arrays: np.ndarray) -> np.ndarray:
    calls.append(tuple(array.shape for array in arrays))
    return score(params, *arrays)
  return call


def sides(model: bloom.Bloom, params: Any, mesh: Any, vocabulary: Any, args: argparse.Namespace,
          calls: dict[str, list]) -> dict[str, Callable[[Workload], Scores]]:
  """{name: run over the workload -> [candidate][question] option log-likelihoods} of both sides."""
  shared_score, whole_score = evaluate.jit_score_shared(model, mesh), evaluate.jit_score(model, mesh)
  row_multiple = partitioning.data_parallel_size(mesh)

  def shared(workload: Workload) -> Scores:
    with partitioning.activation_rules(mesh):
      return evaluate.score_shared_examples(*workload, recording(shared_score, params, calls["shared"]), vocabulary,
                                            args.batch_size, args.max_length, row_multiple=row_multiple)

  def per_prompt(workload: Workload) -> Scores:
    with partitioning.activation_rules(mesh):
      flat = evaluate.score_examples(whole_prompts(workload), recording(whole_score, params, calls["per_prompt"]),
                                     vocabulary, args.batch_size, args.max_length, desc="exam (per prompt)",
                                     row_multiple=row_multiple)
    sizes = np.cumsum([0] + [len(exam) for exam in workload[1]])
    return [flat[start:end] for start, end in zip(sizes[:-1], sizes[1:])]

  return {"shared": shared, "per_prompt": per_prompt}


def work_figures(calls: list[tuple[tuple[int, ...], ...]]) -> dict[str, Any]:
  """Batches, model calls, token positions through the layers (padding and filler rows included) and the compiled
  shapes of one run, from the shapes its scorer was called with: (prefixes, question rows) for ours, (contexts) for
  the peer, each then options of more than one token scored in one more call over the copied cache."""
  positions, model_calls, shapes = 0, 0, set()
  for arrays in calls:
    rows = arrays[:-2:2]  # the token arrays: [prefixes, questions] or [contexts]
    option_rows, num_options, option_length = arrays[-1]
    positions += sum(b * l for b, l in rows) + option_rows * num_options * (option_length - 1)
    model_calls += len(rows) + (option_length > 1)
    shapes.add(" / ".join(f"{b}x{l}" for b, l in rows))
  return {"batches": len(calls), "calls": model_calls, "positions": positions, "shapes": sorted(shapes)}


def max_diff(a: Scores, b: Scores) -> float:
  return max(float(np.max(np.abs(x - y))) for rows_a, rows_b in zip(a, b) for x, y in zip(rows_a, rows_b))


def environment() -> dict[str, Any]:
  """The versions and the date the figures were measured with."""
  import flax
  import jaxlib
  return {"versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                       "python": platform.python_version()},
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def format_table(figures: dict[str, Any]) -> str:
  """The side-by-side results and the setup, as a Markdown table."""
  shared, peer = figures["shared"], figures["per_prompt"]
  reached = "reached" if figures["target_reached"] else "NOT reached"

  def row(label: str, cell: Callable[[dict], str]) -> tuple[str, str, str]:
    return (label, cell(shared), cell(peer))

  rows = [("", COLUMNS["shared"], COLUMNS["per_prompt"]),
          row("exam prompts scored/s (median)", lambda c: f"{c['prompts_per_s']:,.1f}"),
          row("s / run (median)", lambda c: f"{c['median_s']:.3f}"),
          row("s / run (min .. max)", lambda c: f"{min(c['seconds']):.3f} .. {max(c['seconds']):.3f}"),
          ("ratio ours / per prompt", f"**{figures['ratio']:.2f}x** (target {TARGET_RATIO}x: {reached})", "1.00x"),
          row("batches (model calls) / run", lambda c: f"{c['work']['batches']} ({c['work']['calls']})"),
          row("token positions through the layers / run (padding included)",
              lambda c: f"{c['work']['positions']:,}"),
          row("compiled shapes (rows x length)", lambda c: ", ".join(c["work"]["shapes"])),
          row("warm-up: first run, compiles, not timed", lambda c: f"{c['warmup_s']:.1f} s")]
  load, config = figures["workload"], figures["config"]
  setup = (f"config: hidden {config['hidden_size']}, layers {config['num_layers']}, heads {config['num_heads']}, "
           f"vocab {config['vocab_size']}; {figures['num_params']:,} parameters; float32; jax "
           f"{figures['versions']['jax']}, flax {figures['versions']['flax']}, XLA CPU default threads\n"
           f"workload: {load['candidates']} worked examples (ECQA, {load['prefix_tokens']['min']} .. "
           f"{load['prefix_tokens']['max']} tokens, mean {load['prefix_tokens']['mean']:.1f}) x {load['exam_size']} "
           f"{load['exam']} questions ({load['question_tokens']['min']} .. {load['question_tokens']['max']} tokens, "
           f"mean {load['question_tokens']['mean']:.1f}; {load['options']} options) = {figures['prompts']} exam "
           f"prompts per run; tokenizer fixture ({TOKENIZER}); {figures['batch_size']} exam prompts per call; "
           f"{figures['repeats']} timed runs each\n"
           f"check (the warm-up runs): {figures['check']['same_ids']} / {figures['prompts']} prompts tokenize as "
           f"prefix + question; max abs diff of all {figures['check']['options']} option log-likelihoods "
           f"{figures['check']['max_abs_diff']:.2e} (atol {figures['atol']}); timed runs "
           f"{figures['final_max_abs_diff']:.2e}\n" + machine_line(figures))
  return markdown_table(rows) + "\n\n" + setup


def main(argv: Optional[list[str]] = None) -> int:
  args = parse_args(argv)
  cores = os.cpu_count() or 1
  print(f"jax devices: {jax.devices()}")
  vocabulary = vocabularies.HfTokenizerVocabulary(os.path.join(REPO, TOKENIZER))
  workload = load_workload(args, vocabulary)
  prefixes, exams = workload
  prefix_lengths = [len(vocabularies.encode_prompt(vocabulary, p)) for p in prefixes]
  question_lengths = [len(vocabulary.encode(e.context)) for exam in exams for e in exam]
  prompts = len(question_lengths)
  stats = lambda xs: {"min": min(xs), "max": max(xs), "mean": statistics.mean(xs)}  # noqa: E731
  load = {"candidates": len(prefixes), "exam_size": args.exam_size, "exam": args.exam,
          "options": len(exams[0][0].options), "prefix_tokens": stats(prefix_lengths),
          "question_tokens": stats(question_lengths)}
  print(f"{len(prefixes)} worked examples ({min(prefix_lengths)} .. {max(prefix_lengths)} tokens) x {args.exam_size} "
        f"{args.exam} questions ({min(question_lengths)} .. {max(question_lengths)} tokens)")
  matching = same_ids(workload, vocabulary)
  if matching != prompts:
    print(f"error: {prompts - matching} of {prompts} exam prompts tokenize otherwise than prefix + question, so the "
          "two sides would score different tokens; not timing", file=sys.stderr)
    return 1

  mesh = partitioning.make_mesh(1, -1, 1)
  model, params = random_model(args, mesh)
  calls: dict[str, list] = {"shared": [], "per_prompt": []}
  runs = sides(model, params, mesh, vocabulary, args, calls)

  # Warm-up and check: the first run of each over the whole workload compiles every shape it meets.
  first, warmup_s = {}, {}
  for name, run in runs.items():
    start = time.perf_counter()
    first[name] = run(workload)
    warmup_s[name] = time.perf_counter() - start
  work = {name: work_figures(recorded) for name, recorded in calls.items()}
  check = max_diff(first["shared"], first["per_prompt"])
  options = sum(len(e.options) for exam in exams for e in exam)
  print("warm-up (compiles): " + ", ".join(f"{name} {s:.1f} s" for name, s in warmup_s.items())
        + f"; check on {options} options: max abs diff {check:.2e} (atol {args.atol})")
  if not check <= args.atol:
    print(f"error: option log-likelihoods differ by {check:.3e} > {args.atol}; not timing", file=sys.stderr)
    return 1

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
    results[name] = {"seconds": seconds, "median_s": median, "prompts_per_s": prompts / median,
                     "warmup_s": warmup_s[name], "work": work[name]}
    print(f"{name}: median {median:.3f} s over {args.repeats} runs ({prompts / median:,.1f} exam prompts/s)")
  final = max_diff(last["shared"], last["per_prompt"])
  ratio = results["shared"]["prompts_per_s"] / results["per_prompt"]["prompts_per_s"]
  figures = {
      **results, "ratio": ratio, "target_ratio": TARGET_RATIO, "target_reached": ratio >= TARGET_RATIO,
      "config": {"hidden_size": args.hidden_size, "num_layers": args.num_layers, "num_heads": args.num_heads,
                 "vocab_size": args.vocab_size, "dtype": "float32"},
      "workload": load, "prompts": prompts, "tokenizer": TOKENIZER, "batch_size": args.batch_size,
      "max_length": args.max_length, "repeats": args.repeats, "atol": args.atol,
      "check": {"same_ids": matching, "options": options, "max_abs_diff": check}, "final_max_abs_diff": final,
      "num_params": common.count_params(params), "mesh": dict(mesh.shape), "cpu": cpu_model(), "cores": cores,
      "background_cores": background, **environment(),
  }
  publish(figures, format_table(figures), args.json)
  if not final <= args.atol:
    print(f"error: the timed runs' log-likelihoods differ by up to {final:.3e} > {args.atol}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
