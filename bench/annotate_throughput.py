"""Annotation throughput: teacherlm-jax's annotation loop vs the official release's Hugging Face `generate` loop.

`--lengths lognormal` (the default): EOS-terminated outputs of long-tailed lengths, ours with slots (the
continuous-batching engine), ours with static batches, batched HF `generate` and the release's batch-1 loop; see
`annotate_lognormal.py`. `--lengths fixed`, what follows: every prompt exactly `--new_tokens` tokens.

Both run in one process, on the same weights, the same prompts and the same number of new tokens, in float32 on
the CPU:

  1. a random `BloomForCausalLM` is built from the flags (its weights perturbed so that biases and LayerNorms are
     not trivial, plus `--weight_noise` so that greedy continuations are not one repeated token) and saved with
     `save_pretrained` into a temporary directory; ours loads that directory as the annotation loop loads a Hugging
     Face teacher (`convert.load_model(..., scan_layers=False)`: per-layer params on the loop's (1, -1, 1) mesh);
  2. the prompts are real teacher prompts: the `--teacher` (default CoT) prompt of the first `--num_prompts` / 2
     records of the embedded ECQA test and CREAK validation samples (`tasks/data`), made and tokenized by the loop's
     own `annotate.prepare_chunk` (`annotation_inputs.sample(...).prompt(teacher)`) with the tokenizer fixture
     `tests/fixtures/tokenizer/tokenizer.json` (512 ids, all below the model's vocab size);
  3. a greedy check: ours (`annotate.decode_rows` with temperature 0, the first `--check_prompts` prompts in one
     left-padded batch) and HF `generate(do_sample=False)` must continue each prompt with the same
     `--check_tokens` tokens;
  4. warm-up: ours once on all prompts (compiling one decode program per batch shape), HF on two prompts;
  5. timing, every run forced to exactly `--new_tokens` new tokens: ours is the annotation loop's decoding path,
     `annotate.decode_rows` (prompts sorted by length into batches of `--batch_size`, left-padded to bucket
     lengths) over `decoding.jit_generate` on the mesh, sampling at temperature 1.0 with EOS disabled
     (eos_id=-1); theirs is the release's loop: one prompt at a time (batch size 1), `generate(do_sample=True,
     top_k=0, top_p=1.0, temperature=1.0, min_new_tokens=max_new_tokens=new_tokens, use_cache=True)` under
     `torch.inference_mode()`.
     Ours runs `--repeats` times (half before HF, half after, so that drifting background load hits both alike);
     HF runs once over `--hf_prompts` of the prompts (default 16, evenly spread over them; at 5 s a prompt all 64
     would take 5 minutes).
     Samples/s = prompts / seconds (ours: the median run).

torch uses as many intra-op threads as the machine has cores (`torch.set_num_threads`); XLA's CPU backend uses
every core by default.

  python bench/annotate_throughput.py --lengths fixed [--hidden_size 512 --num_layers 8 --num_heads 8 --vocab_size 32000]
      [--num_prompts 64 --new_tokens 256 --batch_size 32 --hf_prompts 16 --repeats 2]
      [--first_phase_tokens N --phase_growth G] [--json OUT]

torch and transformers are needed only here: `pip install torch==2.13.0 transformers`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The machine and model helpers are shared with the forward benchmark, so all benchmarks measure alike.
from forward_throughput import (background_cores, cpu_model, cpu_seconds, import_torch, machine_line,  # noqa: E402
                                make_hf_model, markdown_table, model_parser, publish, run_environment,
                                torch_on_all_cores, warn_if_busy)

from tasks import rendering  # noqa: E402
from teacherlm_jax import annotate, annotation_inputs, convert, decoding, partitioning, vocabularies  # noqa: E402
from teacherlm_jax.models import bloom, common# noqa: E402

TARGET_RATIO = 20.0  # the annotation issue's target: at least 20x the release's samples/s on CPU
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("tasks/data/ecqa/test.jsonl", "tasks/data/creak/validation.jsonl")
TOKENIZER = "tests/fixtures/tokenizer/tokenizer.json"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
  """The command-line flags (model size, prompts, decoding, batch size, repeats, output file)."""
  parser = model_parser(__doc__)
  parser.add_argument("--num_prompts", type=int, default=None,
                      help="prompts annotated: the first half from ECQA test, the rest from CREAK validation "
                           "(default 64; lognormal: 384, the 200 records cycled)")
  parser.add_argument("--teacher", default="cot", choices=list(rendering.TEACHERS), help="whose prompt")
  parser.add_argument("--new_tokens", type=int, default=256,
                      help="tokens generated per prompt, on both sides (256: gin/runs/annotate.gin's MAX_NEW_TOKENS)")
  parser.add_argument("--batch_size", type=int, default=32,
                      help="ours: AnnotationConfig.batch_size (32, the loop's default, was also the fastest here)")
  parser.add_argument("--max_input_length", type=int, default=512, help="ours: AnnotationConfig.max_input_length")
  parser.add_argument("--hf_prompts", type=int, default=16,
                      help="HF: time only N of the prompts, evenly spread over them (at most --num_prompts)")
  parser.add_argument("--repeats", type=int, default=2,
                      help="timed runs of ours over all prompts (half before HF's, half after)")
  parser.add_argument("--check_prompts", type=int, default=3, help="prompts of the greedy check")
  parser.add_argument("--check_tokens", type=int, default=8, help="greedy tokens that must match per prompt")
  parser.add_argument("--first_phase_tokens", type=int, default=decoding.DecodingConfig.first_phase_tokens,
                      help="ours: DecodingConfig.first_phase_tokens (new tokens of the first decoding phase, the cache "
                      "growing in each later one; 0 = one phase over the whole cache)")
  parser.add_argument("--phase_growth", type=float, default=decoding.DecodingConfig.phase_growth,
                      help="ours: DecodingConfig.phase_growth (each phase's new tokens over the previous phase's)")
  parser.add_argument("--weight_noise", type=float, default=0.2,
                      help="std of extra Gaussian noise added to every weight of the random model, so that its greedy "
                      "continuations are not one repeated token (which would make the check say little)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, metavar="OUT", help="also write the figures to this JSON file")
  parser.add_argument("--lengths", choices=("lognormal", "fixed"), default="lognormal",
                      help="lognormal: every prompt's output length drawn (seeded) from a log-normal, a few at the "
                           "cap, ended by EOS on every side; fixed: exactly --new_tokens for every prompt")
  parser.add_argument("--median_tokens", type=float, default=200.0, help="lognormal: the median output length")
  parser.add_argument("--sigma", type=float, default=0.7, help="lognormal: sigma of log(length)")
  parser.add_argument("--cap", type=int, default=1024, help="lognormal: the longest output (max_new_tokens)")
  parser.add_argument("--at_cap", type=float, default=0.05, help="lognormal: the fraction of prompts at the cap")
  parser.add_argument("--tiers", default="long_tail", help="lognormal, ours with slots: 'long_tail' "
                      "(engine.long_tail_tiers), 'one' (one tier), or 'S:L,S:L'")
  parser.add_argument("--steps_per_call", type=int, default=16, help="lognormal: the engine's steps per call")
  parser.add_argument("--hf_batch_sizes", default="8,16", help="lognormal: batch sizes tried for batched generate")
  parser.add_argument("--hf_batched_prompts", type=int, default=16,
                      help="lognormal: prompts (evenly spread) for each batched generate trial")
  args = parser.parse_args(argv)
  if args.num_prompts is None:
    args.num_prompts = 384 if args.lengths == "lognormal" else 64
  if args.lengths == "lognormal" and args.hf_prompts == 16:
    args.hf_prompts = 8  # batch 1 at ~300 tokens a prompt: about 1 minute
  if not 1 <= args.hf_prompts <= args.num_prompts or args.repeats < 1 or args.num_prompts < 1:
    parser.error("need 1 <= --hf_prompts <= --num_prompts and --repeats >= 1")
  if not 1 <= args.check_prompts <= args.num_prompts or args.check_tokens < 1:
    parser.error("need 1 <= --check_prompts <= --num_prompts and --check_tokens >= 1")
  return args


def annotation_config(args: argparse.Namespace, batch_size: int, max_new_tokens: int, temperature: float
                      ) -> annotate.AnnotationConfig:
  """The annotation loop's config for our side (its input and output_dir are never used: nothing is read or written
  through them)."""
  return annotate.AnnotationConfig(
      input=annotation_inputs.InputSpec(os.path.join(REPO, SOURCES[0])), output_dir=tempfile.gettempdir(),
      teachers=((args.teacher, "unused"),), max_input_length=args.max_input_length, max_new_tokens=max_new_tokens,
      temperature=temperature, seed=args.seed, batch_size=batch_size)


def load_prompts(args: argparse.Namespace, vocabulary: Any) -> list[tuple[int, list[int], int]]:
  """The loop's rows (index, prompt ids, prompt tokens cut) of the `--teacher` prompts of the first records of the
  embedded ECQA and CREAK samples (half each; ECQA first), made by `annotate.prepare_chunk`."""
  items: list[annotation_inputs.Item] = []
  counts = ((args.num_prompts + 1) // 2, args.num_prompts // 2)
  for source, count in zip(SOURCES, counts):
    spec = annotation_inputs.InputSpec(os.path.join(REPO, source))
    for _, location, record in itertools.islice(annotation_inputs.iter_items(spec), count):
      items.append((len(items), location, record))
  if len(items) < args.num_prompts:
    sys.exit(f"error: the embedded samples hold only {len(items)} records; use --num_prompts <= {len(items)}")
  rejects, rows = annotate.prepare_chunk(items, args.teacher, annotation_config(args, 1, 1, 0.0), vocabulary)
  if rejects:
    sys.exit(f"error: prompts were rejected: {rejects}")
  if max(max(ids) for _, ids, _ in rows) >= args.vocab_size:
    sys.exit(f"error: the tokenizer gives ids up to {max(max(ids) for _, ids, _ in rows)}, not below --vocab_size")
  return rows


def build_teacher(args: argparse.Namespace, torch: Any, transformers: Any, mesh: Any) -> tuple[Any, bloom.Bloom, Any]:
  """(HF model, our model, our params): the random HF BLOOM of the other benchmarks (plus `--weight_noise`), saved
  with `save_pretrained` and loaded back as the annotation loop loads a Hugging Face teacher
  (`convert.load_model(..., scan_layers=False)` onto the mesh)."""
  hf_model = make_hf_model(args, torch, transformers)
  with torch.no_grad():  # the other benchmarks' weights (init + 0.02 noise) make greedy decoding repeat one token
    for parameter in hf_model.parameters():
      parameter.add_(args.weight_noise * torch.randn_like(parameter))
  with tempfile.TemporaryDirectory() as hf_dir:
    hf_model.save_pretrained(hf_dir)
    model, params = convert.load_model(hf_dir, mesh=mesh, dtype="float32", scan_layers=False)
  return hf_model, model, params


class Ours:
  """The annotation loop's decoding of a chunk's rows: `annotate.decode_rows` over `decoding.jit_generate` on the
  mesh, inside `partitioning.activation_rules`, as `annotate.annotate_teacher` runs it."""

  def __init__(self, model: bloom.Bloom, params: Any, mesh: Any, config: annotate.AnnotationConfig,
               decode: decoding.DecodingConfig):
    self.params, self.mesh, self.config = params, mesh, config
    self.generate = decoding.jit_generate(model, decode, config.seed, mesh=mesh)

  def __call__(self, rows: list[tuple[int, list[int], int]]) -> dict[int, tuple[np.ndarray, int]]:
    with partitioning.activation_rules(self.mesh):
      return annotate.decode_rows(rows, lambda *a: self.generate(self.params, *a), self.config,
                                  partitioning.data_parallel_size(self.mesh))


def hf_generate(torch: Any, hf_model: Any, ids: list[int], new_tokens: int, sample: bool) -> list[int]:
  """The release's generation of one prompt (batch size 1): exactly `new_tokens` new token ids."""
  input_ids = torch.tensor([ids], dtype=torch.long)
  settings = ({"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0} if sample else
              {"do_sample": False})
  with torch.inference_mode():
    output = hf_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                               pad_token_id=hf_model.config.pad_token_id, **settings)
  return output[0, len(ids):].tolist()


def greedy_check(args: argparse.Namespace, torch: Any, hf_model: Any, model: bloom.Bloom, params: Any, mesh: Any,
                 rows: list) -> dict[str, Any]:
  """Greedy continuations of the first `--check_prompts` prompts by ours (one left-padded batch) and by HF."""
  check_rows = rows[:args.check_prompts]
  config = annotation_config(args, len(check_rows), args.check_tokens, 0.0)
  ours = Ours(model, params, mesh, config, decoding.DecodingConfig(max_new_tokens=args.check_tokens, eos_id=-1))
  outputs = ours(check_rows)
  mismatches, lines = [], []
  for index, ids, _ in check_rows:
    mine = [int(t) for t in outputs[index][0][:outputs[index][1]]]
    theirs = hf_generate(torch, hf_model, ids, args.check_tokens, sample=False)
    lines.append(f"  prompt {index} ({len(ids)} tokens): ours {mine} HF {theirs}")
    if mine != theirs:
      mismatches.append(index)
  print(f"greedy check, {args.check_tokens} tokens of {len(check_rows)} prompts:\n" + "\n".join(lines))
  return {"prompts": len(check_rows), "tokens": args.check_tokens, "mismatches": mismatches}


def main(argv: Optional[list[str]] = None) -> int:
  args = parse_args(argv)
  if args.lengths == "lognormal":
    import annotate_lognormal  # noqa: E402 (the long-tailed workload, its own module)
    return annotate_lognormal.run(args)
  torch, transformers = import_torch()

  cores = torch_on_all_cores(torch)

  vocabulary = vocabularies.HfTokenizerVocabulary(os.path.join(REPO, TOKENIZER))
  rows = load_prompts(args, vocabulary)
  lengths = [len(ids) for _, ids, _ in rows]
  mesh = partitioning.make_mesh(1, -1, 1)
  batches = [(len(positions), decoding.batch_rows(len(positions), args.batch_size,
                                                  partitioning.data_parallel_size(mesh)), length)
             for positions, length in decoding.plan_batches(lengths, args.batch_size, args.max_input_length)]
  print(f"{len(rows)} {args.teacher} prompts, {min(lengths)} .. {max(lengths)} tokens (mean "
        f"{statistics.mean(lengths):.1f}); ours in {len(batches)} batches (prompts, rows computed, padded "
        f"length): {batches}")
  hf_model, model, params = build_teacher(args, torch, transformers, mesh)
  num_params = common.count_params(params)

  check = greedy_check(args, torch, hf_model, model, params, mesh, rows)
  if check["mismatches"]:
    print(f"error: greedy continuations of prompts {check['mismatches']} differ between ours and HF; not timing",
          file=sys.stderr)
    return 1

  config = annotation_config(args, args.batch_size, args.new_tokens, 1.0)
  ours = Ours(model, params, mesh, config,
              decoding.DecodingConfig(max_new_tokens=args.new_tokens, eos_id=-1, temperature=1.0,
                                      pad_id=vocabulary.pad_id, first_phase_tokens=args.first_phase_tokens,
                                      phase_growth=args.phase_growth))
  start = time.perf_counter()
  ours(rows)
  compile_s = time.perf_counter() - start
  torch.manual_seed(args.seed)
  start = time.perf_counter()
  for _, ids, _ in rows[:2]:
    hf_generate(torch, hf_model, ids, args.new_tokens, sample=True)
  hf_warmup_s = time.perf_counter() - start
  print(f"warm-up: ours on all {len(rows)} prompts (compile + run) {compile_s:.1f} s; HF on "
        f"{min(2, len(rows))} prompts {hf_warmup_s:.1f} s")

  ours_seconds, hf_seconds = [], []
  generated_ok = True

  def time_ours() -> None:
    nonlocal generated_ok
    start = time.perf_counter()
    outputs = ours(rows)
    ours_seconds.append(time.perf_counter() - start)
    generated_ok &= all(length == args.new_tokens for _, length in outputs.values()) and len(outputs) == len(rows)
    print(f"ours: {len(rows)} prompts in {ours_seconds[-1]:.2f} s")

  hf_rows = [rows[i * len(rows) // args.hf_prompts] for i in range(args.hf_prompts)]  # spread over both sources
  before = cpu_seconds()
  for _ in range(args.repeats // 2):
    time_ours()
  torch.manual_seed(args.seed)
  for _, ids, _ in hf_rows:
    start = time.perf_counter()
    generated = hf_generate(torch, hf_model, ids, args.new_tokens, sample=True)
    hf_seconds.append(time.perf_counter() - start)
    generated_ok &= len(generated) == args.new_tokens
  print(f"HF: {args.hf_prompts} prompts in {sum(hf_seconds):.2f} s")
  for _ in range(args.repeats - args.repeats // 2):
    time_ours()
  background = background_cores(before, cpu_seconds())
  if not generated_ok:
    print(f"error: some prompt did not get exactly {args.new_tokens} new tokens", file=sys.stderr)
    return 1
  warn_if_busy(background, cores)

  ours_median = statistics.median(ours_seconds)
  hf_total = sum(hf_seconds)
  results = {
      "teacherlm_jax": {"seconds": ours_seconds, "median_s": ours_median, "prompts": len(rows),
                        "samples_per_s": len(rows) / ours_median,
                        "tokens_per_s": len(rows) * args.new_tokens / ours_median},
      "transformers": {"seconds_per_prompt": hf_seconds, "total_s": hf_total, "prompts": args.hf_prompts,
                       "prompt_indices": [index for index, _, _ in hf_rows],
                       "samples_per_s": args.hf_prompts / hf_total,
                       "tokens_per_s": args.hf_prompts * args.new_tokens / hf_total},
  }
  ratio = results["teacherlm_jax"]["samples_per_s"] / results["transformers"]["samples_per_s"]
  figures = {
      **results,
      "ratio": ratio, "target_ratio": TARGET_RATIO, "target_reached": ratio >= TARGET_RATIO,
      "config": {"hidden_size": args.hidden_size, "num_layers": args.num_layers, "num_heads": args.num_heads,
                 "vocab_size": args.vocab_size, "dtype": "float32"},
      "prompts": {"teacher": args.teacher, "sources": list(SOURCES), "count": len(rows), "tokenizer": TOKENIZER,
                  "min_tokens": min(lengths), "max_tokens": max(lengths), "mean_tokens": statistics.mean(lengths),
                  "batches": [list(batch) for batch in batches]},
      "new_tokens": args.new_tokens, "batch_size": args.batch_size, "repeats": args.repeats,
      "num_params": num_params, "greedy_check": check, "compile_and_first_run_s": compile_s,
      "hf_warmup_s": hf_warmup_s, "first_phase_tokens": args.first_phase_tokens, "phase_growth": args.phase_growth,
      "phase_ends": decoding.phase_ends(decoding.DecodingConfig(
          args.new_tokens, first_phase_tokens=args.first_phase_tokens, phase_growth=args.phase_growth)),
      "weight_noise": args.weight_noise,
      "mesh": dict(mesh.shape), "torch_threads": torch.get_num_threads(),
      "cpu": cpu_model(), "cores": cores, "background_cores": background,
      **run_environment(torch, transformers),
  }
  publish(figures, format_table(figures), args.json)
  return 0


def format_table(figures: dict[str, Any]) -> str:
  """The side-by-side results and the setup, as a Markdown table."""
  ours, theirs = figures["teacherlm_jax"], figures["transformers"]
  n_hf, n_ours = theirs["prompts"], ours["prompts"]
  hf_scope = f"all {n_ours}" if n_hf == n_ours else f"{n_hf} of the {n_ours} (evenly spread)"
  rows = [("", f"teacherlm-jax (annotate.decode_rows, batch {figures['batch_size']})",
           "transformers generate (batch 1, release loop)"),
          ("samples/s", f"{ours['samples_per_s']:,.2f}", f"{theirs['samples_per_s']:,.3f}"),
          ("generated tokens/s", f"{ours['tokens_per_s']:,.1f}", f"{theirs['tokens_per_s']:,.1f}"),
          ("prompts timed", f"all {n_ours}, {figures['repeats']} runs (median {ours['median_s']:.2f} s; "
           f"{' / '.join(f'{s:.2f}' for s in ours['seconds'])} s)",
           f"{hf_scope} prompts, once ({theirs['total_s']:.1f} s; "
           f"{statistics.median(theirs['seconds_per_prompt']):.2f} s / prompt median)"),
          ("ratio ours / HF (samples/s)", f"{figures['ratio']:.1f}x (target {TARGET_RATIO:.0f}x: "
           f"{'reached' if figures['target_reached'] else 'NOT reached'})", ""),
          ("decoding", "sampling, temperature 1.0, EOS disabled (eos_id=-1)",
           "do_sample, top_k 0, top_p 1.0, temperature 1.0, min_new_tokens = max_new_tokens"),
          ("version", f"jax {figures['versions']['jax']}, flax {figures['versions']['flax']}",
           f"torch {figures['versions']['torch']}, transformers {figures['versions']['transformers']}"),
          ("layers, cache", f"per layer (loaded with scan_layers=False); cache grown in phases ending at "
           f"{figures['phase_ends']} new tokens", "nn.ModuleList; DynamicCache"),
          ("threads", f"XLA CPU default (all cores); mesh {figures['mesh']}",
           f"torch.set_num_threads({figures['torch_threads']})")]
  config, prompts = figures["config"], figures["prompts"]
  setup = (f"config: hidden {config['hidden_size']}, layers {config['num_layers']}, heads {config['num_heads']}, "
           f"vocab {config['vocab_size']}; {figures['num_params']:,} parameters; float32; weights: init + 0.02 + "
           f"{figures['weight_noise']:g} Gaussian noise\n"
           f"prompts: {prompts['count']} {prompts['teacher']} teacher prompts (ECQA test + CREAK validation, "
           f"tokenizer fixture), {prompts['min_tokens']} .. {prompts['max_tokens']} tokens (mean "
           f"{prompts['mean_tokens']:.1f}); ours in batches (prompts, rows computed, padded length) "
           f"{[tuple(batch) for batch in prompts['batches']]}; "
           f"{figures['new_tokens']} new tokens each on both sides\n"
           f"greedy check: {figures['greedy_check']['tokens']} tokens of {figures['greedy_check']['prompts']} prompts "
           f"identical; ours' first call (compile + run) {figures['compile_and_first_run_s']:.1f} s, not timed\n"
           + machine_line(figures))
  return markdown_table(rows) + "\n\n" + setup


if __name__ == "__main__":
  sys.exit(main())
