"""Scoring (forward pass) throughput: teacherlm-jax's Flax BLOOM vs Hugging Face `transformers` in torch.

Both run in one process, on the same weights and the same inputs, in float32 on the CPU:

  1. a random `BloomForCausalLM` is built from the flags (its weights perturbed so that biases and LayerNorms are
     not trivial) and saved with `save_pretrained` into a temporary directory;
  2. `teacherlm_jax.convert.load_hf` loads that directory, so the two models hold identical weights;
  3. one warm-up forward of each (which also compiles ours) gives logits that must agree within `--atol`;
  4. `--repeats` timed forwards of each, taking turns: ours under `jax.jit` (waiting with `block_until_ready`),
     theirs under `torch.inference_mode()` with `use_cache=False`. Tokens/s = batch_size * seq_len / median seconds.

torch uses as many intra-op threads as the machine has cores (`torch.set_num_threads`); XLA's CPU backend uses
every core by default.

  python bench/forward_throughput.py [--hidden_size 512 --num_layers 8 --num_heads 8 --vocab_size 32000]
      [--batch_size 8 --seq_len 256 --repeats 5] [--json OUT]

torch and transformers are needed only here: `pip install torch==2.13.0 transformers`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from teacherlm_jax import convert
from teacherlm_jax.models import bloom, common

INSTALL_HINT = "pip install torch==2.13.0 transformers"


def model_parser(doc: str) -> argparse.ArgumentParser:
  """A parser (described by the first line of `doc`) with the model flags every benchmark shares: the random
  BLOOM's size, 41.6M parameters by default."""
  parser = argparse.ArgumentParser(description=doc.split("\n")[0])
  parser.add_argument("--hidden_size", type=int, default=512)
  parser.add_argument("--num_layers", type=int, default=8)
  parser.add_argument("--num_heads", type=int, default=8)
  parser.add_argument("--vocab_size", type=int, default=32000)
  return parser


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
  """The command-line flags (model size, input shape, repeats, tolerance, output file)."""
  parser = model_parser(__doc__)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5, help="timed forwards of each model, after one warm-up")
  parser.add_argument("--atol", type=float, default=1e-3, help="largest allowed max abs difference of the logits")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, metavar="OUT", help="also write the figures to this JSON file")
  return parser.parse_args(argv)


def import_torch() -> tuple[Any, Any]:
  """(torch, transformers), or exits with the install line if either is missing."""
  try:
    import torch
    import transformers
  except ImportError as error:
    sys.exit(f"error: this benchmark needs torch and transformers ({error}); install them with: {INSTALL_HINT}")
  return torch, transformers


def run_environment(torch: Any, transformers: Any, **extra_versions: str) -> dict[str, Any]:
  """The versions and the date a benchmark's figures were measured with (for its --json)."""
  import flax
  import jaxlib
  versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, **extra_versions,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version()}
  return {"versions": versions,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def publish(figures: dict[str, Any], table: str, json_path: Optional[str]) -> None:
  """Prints a benchmark's table and writes its figures to `json_path` (when given)."""
  print()
  print(table)
  if json_path:
    with open(json_path, "w", encoding="utf-8") as out:
      json.dump(figures, out, indent=2)
    print(f"\nwrote {json_path}")


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (or what `platform` knows elsewhere)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def cpu_seconds() -> tuple[float, Optional[float], float]:
  """(wall clock, CPU seconds all processes have used so far or None without /proc/stat, this process's CPU seconds)."""
  busy = None
  try:
    with open("/proc/stat", encoding="utf-8") as stat:
      user, nice, system, _, _, irq, softirq, steal = (int(n) for n in stat.readline().split()[1:9])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError):
    pass
  own = os.times()
  return time.perf_counter(), busy, own.user + own.system


def background_cores(before: tuple[float, Optional[float], float], after: tuple[float, Optional[float], float]
                     ) -> Optional[float]:
  """Average number of cores that other processes kept busy between two `cpu_seconds()` snapshots."""
  if before[1] is None or after[1] is None:
    return None
  return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def make_hf_model(args: argparse.Namespace, torch: Any, transformers: Any) -> Any:
  """A random float32 `BloomForCausalLM` of the flags' size, in eval mode, with every parameter perturbed."""
  config = transformers.BloomConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                                    n_layer=args.num_layers, n_head=args.num_heads, use_cache=False)
  torch.manual_seed(args.seed)
  model = transformers.BloomForCausalLM(config).to(torch.float32).eval()
  with torch.no_grad():  # default init leaves biases at 0 and LayerNorms at 1: perturb them so the check means more
    for parameter in model.parameters():
      parameter.add_(0.02 * torch.randn_like(parameter))
  return model


def torch_on_all_cores(torch: Any) -> int:
  """Gives torch one intra-op thread per core (XLA's CPU backend uses every core by default) and says so; returns
  the number of cores."""
  cores = os.cpu_count() or 1
  torch.set_num_threads(cores)
  print(f"torch intra-op threads: {torch.get_num_threads()} (= the {cores} cores); jax devices: {jax.devices()}")
  return cores


def warn_if_busy(background: Optional[float], cores: int) -> None:
  """Warns (stderr) when other processes kept more than 0.1 cores busy while timing."""
  if background is not None and background > 0.1:
    print(f"warning: other processes kept {background:.2f} of the {cores} cores busy while timing; these figures are "
          "not those of an idle machine", file=sys.stderr)


def machine_line(figures: dict[str, Any]) -> str:
  """The footer line every benchmark prints under its table: CPU, cores, background load, Python."""
  background = "unknown" if figures["background_cores"] is None else f"{figures['background_cores']:.2f}"
  return (f"machine: {figures['cpu']}, {figures['cores']} cores; cores kept busy by other processes while timing: "
          f"{background}; Python {figures['versions']['python']}")


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
  """Wall-clock seconds of `repeats` calls of each of `calls` (each must return only once its work is done).

  The calls take turns, in alternating order, so that background load on a shared machine hits both alike.
  """
  seconds: dict[str, list[float]] = {name: [] for name in calls}
  for repeat in range(repeats):
    for name in (list(calls) if repeat % 2 == 0 else list(reversed(calls))):
      start = time.perf_counter()
      calls[name]()
      seconds[name].append(time.perf_counter() - start)
  return seconds


def format_table(figures: dict[str, Any]) -> str:
  """The side-by-side results and the setup, as a Markdown table."""
  ours, theirs = figures["teacherlm_jax"], figures["transformers"]
  rows = [("", "teacherlm-jax (jax.jit)", "transformers (torch)"),
          ("tokens/s (median)", f"{ours['tokens_per_s']:,.0f}", f"{theirs['tokens_per_s']:,.0f}"),
          ("s / forward (median)", f"{ours['median_s']:.3f}", f"{theirs['median_s']:.3f}"),
          ("s / forward (min .. max)", f"{min(ours['seconds']):.3f} .. {max(ours['seconds']):.3f}",
           f"{min(theirs['seconds']):.3f} .. {max(theirs['seconds']):.3f}"),
          ("ratio ours / HF", f"{figures['ratio']:.2f}x", ""),
          ("version", f"jax {figures['versions']['jax']}, flax {figures['versions']['flax']}",
           f"torch {figures['versions']['torch']}, transformers {figures['versions']['transformers']}"),
          ("threads", "XLA CPU default (all cores)", f"torch.set_num_threads({figures['torch_threads']})")]
  config, shape = figures["config"], figures["inputs"]
  setup = (f"config: hidden {config['hidden_size']}, layers {config['num_layers']}, heads {config['num_heads']}, "
           f"vocab {config['vocab_size']}; {figures['num_params']:,} parameters; float32\n"
           f"inputs: batch {shape['batch_size']} x seq {shape['seq_len']} = {shape['tokens']} tokens per forward; "
           f"{figures['repeats']} timed forwards each after 1 warm-up; logits max abs diff "
           f"{figures['max_abs_diff']:.2e}\n"
           + machine_line(figures))
  return markdown_table(rows) + "\n\n" + setup


def markdown_table(rows: list[tuple[str, str, str]]) -> str:
  """A three-column Markdown table whose first row is the header."""
  lines = [f"| {' | '.join(row)} |" for row in rows]
  lines.insert(1, "| --- | --- | --- |")
  return "\n".join(lines)


def build_models(args: argparse.Namespace, torch: Any, transformers: Any,
                 **config_overrides: Any) -> tuple[Any, bloom.Bloom, dict]:
  """(HF model, our model, our params): ours loaded from the HF model's `save_pretrained` directory, with
  `config_overrides` (BloomConfig fields such as scan_layers) applied."""
  hf_model = make_hf_model(args, torch, transformers)
  with tempfile.TemporaryDirectory() as hf_dir:
    hf_model.save_pretrained(hf_dir)
    model, params = convert.load_hf(hf_dir, **config_overrides)
  return hf_model, model, params


def forward_calls(args: argparse.Namespace, torch: Any, hf_model: Any, model: bloom.Bloom,
                  params: dict) -> dict[str, Callable[[], np.ndarray]]:
  """One forward of each model on the same random batch (no padding), each returning float32 logits [b, l, v].

  Ours is `jax.jit`-compiled (params are arguments, not constants) and waited for with `block_until_ready`; theirs
  runs under `torch.inference_mode()` without a KV cache.
  """
  input_ids = np.random.default_rng(args.seed).integers(
      0, args.vocab_size, (args.batch_size, args.seq_len), dtype=np.int32)
  attention_mask = np.ones_like(input_ids)
  jax_ids, jax_mask = jax.numpy.asarray(input_ids), jax.numpy.asarray(attention_mask)
  torch_ids = torch.from_numpy(input_ids.astype(np.int64))
  torch_mask = torch.from_numpy(attention_mask.astype(np.int64))
  forward = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))

  def ours() -> np.ndarray:
    return forward(params, jax_ids, jax_mask).block_until_ready()

  def theirs() -> np.ndarray:
    with torch.inference_mode():
      return hf_model(input_ids=torch_ids, attention_mask=torch_mask, use_cache=False).logits

  return {"teacherlm_jax": ours, "transformers": theirs}


def check_logits(calls: dict[str, Callable[[], Any]], atol: float) -> tuple[float, float]:
  """Warms both calls up (compiling ours) and compares their logits; (max abs diff, seconds of our first call)."""
  start = time.perf_counter()
  ours = np.asarray(calls["teacherlm_jax"]())
  compile_s = time.perf_counter() - start
  max_abs_diff = float(np.max(np.abs(ours - calls["transformers"]().numpy())))
  print(f"logits max abs diff: {max_abs_diff:.3e} (atol {atol}); first jitted call (compile + run): {compile_s:.1f} s")
  return max_abs_diff, compile_s


def main(argv: Optional[list[str]] = None) -> int:
  args = parse_args(argv)
  torch, transformers = import_torch()

  cores = torch_on_all_cores(torch)

  hf_model, model, params = build_models(args, torch, transformers)
  calls = forward_calls(args, torch, hf_model, model, params)
  max_abs_diff, compile_s = check_logits(calls, args.atol)
  if not max_abs_diff <= args.atol:
    print(f"error: the logits differ by {max_abs_diff:.3e} > {args.atol}; not timing", file=sys.stderr)
    return 1

  tokens = args.batch_size * args.seq_len
  before = cpu_seconds()
  results = {}
  for name, seconds in time_interleaved(calls, args.repeats).items():
    median = statistics.median(seconds)
    results[name] = {"seconds": seconds, "median_s": median, "tokens_per_s": tokens / median}
    print(f"{name}: median {median:.3f} s over {args.repeats} forwards")
  background = background_cores(before, cpu_seconds())
  warn_if_busy(background, cores)

  figures = {
      **results,
      "ratio": results["teacherlm_jax"]["tokens_per_s"] / results["transformers"]["tokens_per_s"],
      "config": {"hidden_size": args.hidden_size, "num_layers": args.num_layers, "num_heads": args.num_heads,
                 "vocab_size": args.vocab_size, "dtype": "float32"},
      "inputs": {"batch_size": args.batch_size, "seq_len": args.seq_len, "tokens": tokens},
      "num_params": common.count_params(params), "repeats": args.repeats, "max_abs_diff": max_abs_diff,
      "compile_and_first_run_s": compile_s, "torch_threads": torch.get_num_threads(),
      "cpu": cpu_model(), "cores": cores, "background_cores": background,
      **run_environment(torch, transformers),
  }
  publish(figures, format_table(figures), args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
