"""Training throughput: teacherlm-jax's train step vs Hugging Face `transformers` + torch on the same BLOOM.

Both run in one process, on the same weights, the same batch and the same optimizer, in float32 on the CPU:

  1. a random `BloomForCausalLM` is built from the flags (its weights perturbed so that biases and LayerNorms are
     not trivial) and saved with `save_pretrained` into a temporary directory; `teacherlm_jax.convert.load_hf`
     loads that directory and the params go to `trainer.init_train_state(..., params=...)`;
  2. one batch of `--batch_size` rows of `--seq_len + 1` random tokens (seeded): ours gets it unpacked
     (decoder_input_tokens = tokens[:, :-1], decoder_target_tokens = tokens[:, 1:], decoder_loss_weights = 1), HF
     gets `input_ids = tokens[:, :-1]` with the same targets passed as `shift_labels` (so neither side shifts again
     and both compute the mean cross-entropy over the same batch_size x seq_len tokens, every token weighted);
  3. the same AdamW on both (lr, betas, eps, decoupled weight decay on kernels and embeddings only, global gradient
     norm clipped to 1.0): ours `trainer.make_optimizer(OptimizerConfig(decay='constant', warmup_steps=0, ...))`
     under `trainer.jit_train_step` on a (1, -1, 1) mesh of the CPU device(s) inside
     `partitioning.activation_rules`; theirs `torch.optim.AdamW(fused=True)` (what `transformers.Trainer` picks by
     default with torch >= 2.8, param groups as its `get_decay_parameter_names`) after `clip_grad_norm_`;
  4. `--warmup` steps of each (ours compiles in the first): the first-step losses must agree within `--rtol`; the
     gradient norms, the largest parameter difference after the first update and the later warm-up losses are
     printed as a check that the optimizer steps agree too (BLOOM has no dropout, so train mode is deterministic);
  5. `--steps` timed steps of each, taking turns; ours waits with `block_until_ready` on the metrics, theirs on
     `loss.item()`. Tokens/s = batch_size * seq_len / median seconds per step.

MFU = `trainer.model_flops_per_token(config, seq_len)` x tokens/s / peak FLOP/s, where the peak is an estimate:
the best rate of a large float32 matmul (numpy's BLAS, every core), measured in the same run before and after the
timed steps. `--profile N` then traces one more step of ours and prints where its time goes.

  python bench/train_throughput.py [--hidden_size 512 --num_layers 8 --num_heads 8 --vocab_size 32000]
      [--batch_size 8 --seq_len 256 --steps 5 --warmup 2] [--learning_rate 1e-4 --weight_decay 0.01]
      [--no_scan_layers] [--scan_unroll N] [--profile N] [--json OUT]

torch and transformers are needed only here: `pip install torch==2.13.0 transformers`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The machine and timing helpers are shared with the forward benchmark, so both measure alike.
from forward_throughput import (background_cores, build_models, cpu_model, cpu_seconds, import_torch,  # noqa: E402
                                machine_line, markdown_table, model_parser, publish, run_environment,
                                time_interleaved, torch_on_all_cores, warn_if_busy)

from teacherlm_jax import convert, partitioning, trainer  # noqa: E402
from teacherlm_jax.models import bloom, common# noqa: E402

TARGET_RATIO = 1.5  # the trainer issue's target: at least 1.5x the Hugging Face tokens/s on CPU


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
  """The command-line flags (model size, batch shape, optimizer, steps, tolerance, output file)."""
  parser = model_parser(__doc__)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256, help="tokens per row the loss is computed on")
  parser.add_argument("--steps", type=int, default=5, help="timed train steps of each, after the warm-up")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each first (ours compiles in the first)")
  parser.add_argument("--learning_rate", type=float, default=1e-4)
  parser.add_argument("--weight_decay", type=float, default=0.01)
  parser.add_argument("--b1", type=float, default=0.9)
  parser.add_argument("--b2", type=float, default=0.999)
  parser.add_argument("--eps", type=float, default=1e-8)
  parser.add_argument("--max_grad_norm", type=float, default=1.0)
  parser.add_argument("--rtol", type=float, default=1e-3, help="largest allowed relative difference of the first "
                      "step's losses")
  parser.add_argument("--no_scan_layers", action="store_true",
                      help="ours with its layers unrolled (h_0 ... h_{n-1}) instead of nn.scan")
  parser.add_argument("--scan_unroll", type=int, default=1,
                      help="layers per nn.scan iteration (BloomConfig.scan_unroll; num_layers = fully unrolled)")
  parser.add_argument("--peak_size", type=int, default=4096, help="n of the n x n float32 matmul timed for the peak")
  parser.add_argument("--profile", type=int, default=0, metavar="N",
                      help="after timing, trace one more step of ours with jax.profiler and print where its time goes "
                      "(by kind of op, and the N most expensive XLA ops)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, metavar="OUT", help="also write the figures to this JSON file")
  args = parser.parse_args(argv)
  if args.warmup < 1 or args.steps < 1:
    parser.error("--warmup and --steps must be at least 1 (the first warm-up step is the loss check)")
  return args


def measure_peak_flops(n: int, repeats: int = 3) -> float:
  """Estimated peak float32 FLOP/s: the best of `repeats` n x n matmuls in numpy (its BLAS, every core)."""
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
  np.matmul(a, b)  # warm-up: BLAS threads, page faults
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    np.matmul(a, b)
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def make_batch(args: argparse.Namespace) -> np.ndarray:
  """[batch_size, seq_len + 1] random int32 tokens (fixed seed): inputs are [:, :-1], targets [:, 1:]."""
  return np.random.default_rng(args.seed).integers(0, args.vocab_size, (args.batch_size, args.seq_len + 1),
                                                   dtype=np.int32)


def optimizer_config(args: argparse.Namespace) -> trainer.OptimizerConfig:
  return trainer.OptimizerConfig(learning_rate=args.learning_rate, warmup_steps=0, decay="constant",
                                 weight_decay=args.weight_decay, b1=args.b1, b2=args.b2, eps=args.eps,
                                 max_grad_norm=args.max_grad_norm)


def our_step(args: argparse.Namespace, model: bloom.Bloom, params: dict, tokens: np.ndarray
             ) -> tuple[Callable[[], dict[str, float]], Callable[[], Any], Any, Callable[[], str]]:
  """(one train step returning its metrics as floats, a getter of the current params, the mesh, a getter of the
  compiled step's HLO text).

  The step is `trainer.jit_train_step` (state donated, so each call continues from the last) on a
  (data=1, fsdp=all, tensor=1) mesh, called under `partitioning.activation_rules` and waited for with
  `block_until_ready` on the metrics.
  """
  optimizer = trainer.make_optimizer(optimizer_config(args))
  mesh = partitioning.make_mesh(1, -1, 1)
  shardings = trainer.state_shardings(model, optimizer, mesh)
  state = trainer.init_train_state(model, optimizer, jax.random.key(args.seed), shardings, params=params)
  batch = trainer.global_batch({"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
                                "decoder_loss_weights": np.ones_like(tokens[:, 1:])}, trainer.batch_sharding(mesh))
  step_fn = trainer.jit_train_step(model, optimizer, 1, shardings, mesh)

  def step() -> dict[str, float]:
    nonlocal state
    with partitioning.activation_rules(mesh):
      state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    return {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}

  def hlo_text() -> str:
    with partitioning.activation_rules(mesh):
      return step_fn.lower(state, batch).compile().as_text()

  return step, lambda: state.params, mesh, hlo_text


def hf_step(args: argparse.Namespace, torch: Any, hf_model: Any, tokens: np.ndarray) -> Callable[[], dict[str, float]]:
  """One `transformers` train step (forward with labels, backward, clip_grad_norm_, AdamW) returning its metrics.

  Weight decay applies to weights of 2 or more dims (the Linear weights and the tied embedding), as Trainer's
  `get_decay_parameter_names` (biases and LayerNorms excluded) and as ours. `shift_labels` passes the already
  shifted targets to `ForCausalLMLoss` so the loss covers exactly batch_size x seq_len tokens, as ours does.
  """
  hf_model.train()
  params = [p for p in hf_model.parameters() if p.requires_grad]  # the tied lm_head appears once
  groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.b1, args.b2), eps=args.eps,
                                fused=True)
  input_ids = torch.from_numpy(np.ascontiguousarray(tokens[:, :-1], dtype=np.int64))
  targets = torch.from_numpy(np.ascontiguousarray(tokens[:, 1:], dtype=np.int64))  # ForCausalLMLoss views it

  def step() -> dict[str, float]:
    optimizer.zero_grad(set_to_none=True)
    loss = hf_model(input_ids=input_ids, labels=targets, shift_labels=targets, use_cache=False).loss
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    optimizer.step()
    return {"loss": float(loss.item()), "grad_norm": float(grad_norm)}

  return step


def max_param_diff(our_params: dict, config: bloom.BloomConfig, hf_model: Any) -> float:
  """Largest absolute difference between our params (in HF layout) and the HF model's, over every tensor."""
  hf_state = {name: tensor.detach().numpy() for name, tensor in hf_model.state_dict().items()}
  return max(float(np.max(np.abs(array - hf_state[name])))
             for name, array in convert.hf_tensors(our_params, config, "float32"))


def warm_up(args: argparse.Namespace, calls: dict[str, Callable[[], dict[str, float]]], get_params: Callable,
            config: bloom.BloomConfig, hf_model: Any) -> dict[str, Any]:
  """`--warmup` untimed steps of each; the first compiles ours and its losses are compared.

  Returns the per-step metrics of both, the first call's seconds of ours (compile + run), and the largest param
  difference after the first update.
  """
  history: dict[str, list[dict[str, float]]] = {name: [] for name in calls}
  start = time.perf_counter()
  history["teacherlm_jax"].append(calls["teacherlm_jax"]())
  compile_s = time.perf_counter() - start
  history["transformers"].append(calls["transformers"]())
  param_diff = max_param_diff(get_params(), config, hf_model)
  for _ in range(args.warmup - 1):
    for name, call in calls.items():
      history[name].append(call())
  for i, (ours, theirs) in enumerate(zip(history["teacherlm_jax"], history["transformers"])):
    print(f"warm-up step {i + 1}: loss ours {ours['loss']:.6f} HF {theirs['loss']:.6f} "
          f"(rel diff {relative_diff(ours['loss'], theirs['loss']):.1e}); grad norm ours {ours['grad_norm']:.6f} "
          f"HF {theirs['grad_norm']:.6f}")
  print(f"first jitted step (compile + run): {compile_s:.1f} s; params after the first update differ by at most "
        f"{param_diff:.2e} (learning rate {args.learning_rate:g})")
  return {"history": history, "compile_and_first_step_s": compile_s, "param_max_abs_diff_after_step_1": param_diff}


def op_kind(name: str, op_name: str) -> str:
  """A coarse label for one XLA CPU op of the train step, from its HLO name and the jax op_name metadata."""
  if name.startswith("wrapped_broadcast"):
    return "broadcasts (mostly zero-filled scan stacks)"
  if "dynamic-update-slice" in name or "dynamic-slice" in name:
    return "scan slicing (dynamic-slice / dynamic-update-slice)"
  if "/reduce" in op_name and name.startswith("iota_reduce"):
    return "argmax (accuracy metric)"
  if "ble,ve->blv" in op_name:
    return "LM head matmuls"
  if "/self_attention/" in op_name:
    if "ble,ehtd" in op_name or "blhd,hde" in op_name:
      return "attention projection matmuls (qkv, dense)"
    if "bqhd,bkhd" in op_name or "bhqk,bkhd" in op_name:
      return "attention score / value matmuls"
    return "attention element-wise (ALiBi bias, mask, softmax)"
  if "/mlp/" in op_name:
    return "MLP matmuls" if "dot_general" in op_name else "MLP element-wise (GeLU, bias)"
  if "layernorm" in op_name or "ln_f" in op_name:
    return "LayerNorms"
  if "/while/body/" in op_name:
    return "loss, cross-entropy, embedding and other ops inside the gradient"
  if op_name:
    return "optimizer update and metrics"
  return "other (copies, ...)"


def profile_step(step: Callable[[], Any], hlo: str, top: int) -> None:
  """Traces one call of `step` with `jax.profiler` and prints the XLA ops' time by kind and the `top` costliest ops.

  Op times are summed over XLA's CPU threads (a few ops run side by side), so the total can differ from the wall
  time a little.
  """
  import collections
  import glob
  import re

  ops = {}
  for line in hlo.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      ops[match.group(1)] = (match.group(2), op_name.group(1) if op_name else "")
  with tempfile.TemporaryDirectory() as log_dir:
    start = time.perf_counter()
    jax.profiler.start_trace(log_dir)
    step()
    jax.profiler.stop_trace()
    wall = time.perf_counter() - start
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{log_dir}/**/*.xplane.pb", recursive=True)[0])
    per_op: collections.Counter = collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        if not line.name.startswith("tf_XLAEigen"):  # the threads that run XLA's ops
          continue
        for event in line.events:
          if event.name in ops and not event.name.startswith(("while", "call", "conditional")):  # not the loops
            per_op[event.name] += event.duration_ns / 1e6
  by_kind: collections.Counter = collections.Counter()
  for name, ms in per_op.items():
    by_kind[op_kind(name, ops[name][1])] += ms
  total = sum(per_op.values())
  print(f"\nprofile of one more step of ours: {1e3 * wall:.0f} ms wall, {total:.0f} ms in XLA ops")
  for kind, ms in by_kind.most_common():
    print(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {kind}")
  print(f"the {top} costliest XLA ops:")
  for name, ms in per_op.most_common(top):
    shape, op_name = ops[name]
    print(f"  {ms:8.1f} ms  {name:36s} {shape[:40]:40s} {op_name.split('jit(train_step)/')[-1][-90:]}")


def relative_diff(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-30)


def format_table(figures: dict[str, Any]) -> str:
  """The side-by-side results and the setup, as a Markdown table."""
  ours, theirs = figures["teacherlm_jax"], figures["transformers"]
  optim = figures["optimizer"]
  rows = [("", "teacherlm-jax (trainer.jit_train_step)", "transformers (torch)"),
          ("tokens/s (median)", f"{ours['tokens_per_s']:,.0f}", f"{theirs['tokens_per_s']:,.0f}"),
          ("s / step (median)", f"{ours['median_s']:.3f}", f"{theirs['median_s']:.3f}"),
          ("s / step (min .. max)", f"{min(ours['seconds']):.3f} .. {max(ours['seconds']):.3f}",
           f"{min(theirs['seconds']):.3f} .. {max(theirs['seconds']):.3f}"),
          ("ratio ours / HF", f"{figures['ratio']:.2f}x (target {TARGET_RATIO}x: "
           f"{'reached' if figures['target_reached'] else 'NOT reached'})", ""),
          ("model GFLOP/s", f"{ours['model_flops_per_s'] / 1e9:.1f}", f"{theirs['model_flops_per_s'] / 1e9:.1f}"),
          ("MFU (vs estimated peak)", f"{100 * ours['mfu']:.1f}%", f"{100 * theirs['mfu']:.1f}%"),
          ("first-step loss", f"{ours['first_loss']:.6f}", f"{theirs['first_loss']:.6f}"),
          ("optimizer", "optax clip_by_global_norm + adamw (trainer.make_optimizer)",
           "clip_grad_norm_ + torch.optim.AdamW(fused=True)"),
          ("version", f"jax {figures['versions']['jax']}, flax {figures['versions']['flax']}, "
           f"optax {figures['versions']['optax']}",
           f"torch {figures['versions']['torch']}, transformers {figures['versions']['transformers']}"),
          ("layers", (f"nn.scan (unroll {figures['scan_unroll']})" if figures["scan_layers"] else
                      "unrolled (--no_scan_layers)"), "nn.ModuleList"),
          ("threads", f"XLA CPU default (all cores); mesh {figures['mesh']}",
           f"torch.set_num_threads({figures['torch_threads']})")]
  config, shape = figures["config"], figures["inputs"]
  setup = (f"config: hidden {config['hidden_size']}, layers {config['num_layers']}, heads {config['num_heads']}, "
           f"vocab {config['vocab_size']}; {figures['num_params']:,} parameters; float32; "
           f"{figures['model_flops_per_token'] / 1e6:.1f} MFLOP per token (trainer.model_flops_per_token)\n"
           f"batch: {shape['batch_size']} x seq {shape['seq_len']} = {shape['tokens']} loss tokens per step; "
           f"{figures['steps']} timed steps each after {figures['warmup']} warm-up; first-step loss rel diff "
           f"{figures['first_loss_rel_diff']:.1e}; params after one update differ by <= "
           f"{figures['param_max_abs_diff_after_step_1']:.1e}; first jitted step (compile + run) "
           f"{figures['compile_and_first_step_s']:.1f} s\n"
           f"optimizer: AdamW lr {optim['learning_rate']:g} constant, betas ({optim['b1']}, {optim['b2']}), "
           f"eps {optim['eps']:g}, weight decay {optim['weight_decay']:g} (kernels and embeddings), "
           f"clip global norm {optim['max_grad_norm']:g}\n"
           f"peak (estimate): {figures['peak_flops'] / 1e9:.0f} GFLOP/s = best float32 {figures['peak_size']}^2 "
           f"matmul in numpy on all cores\n"
           + machine_line(figures))
  return markdown_table(rows) + "\n\n" + setup


def main(argv: Optional[list[str]] = None) -> int:
  args = parse_args(argv)
  torch, transformers = import_torch()
  import optax

  cores = torch_on_all_cores(torch)

  hf_model, model, params = build_models(args, torch, transformers, scan_layers=not args.no_scan_layers,
                                         scan_unroll=args.scan_unroll)
  num_params = common.count_params(params)
  tokens = make_batch(args)
  ours, get_params, mesh, hlo_text = our_step(args, model, params, tokens)
  del params  # the train state holds its own copy; ours is donated from step to step
  calls = {"teacherlm_jax": ours, "transformers": hf_step(args, torch, hf_model, tokens)}

  warm = warm_up(args, calls, get_params, model.config, hf_model)
  first = {name: steps[0]["loss"] for name, steps in warm["history"].items()}
  first_diff = relative_diff(first["teacherlm_jax"], first["transformers"])
  if not first_diff <= args.rtol:
    print(f"error: the first-step losses differ by {first_diff:.3e} (relative) > {args.rtol}; not timing",
          file=sys.stderr)
    return 1

  n_tokens = args.batch_size * args.seq_len
  flops_per_token = trainer.model_flops_per_token(model.config, args.seq_len)
  peaks = [measure_peak_flops(args.peak_size)]
  before = cpu_seconds()
  timed = time_interleaved(calls, args.steps)
  background = background_cores(before, cpu_seconds())
  peaks.append(measure_peak_flops(args.peak_size))
  peak = max(peaks)  # before and after timing: the better one is the less disturbed by other processes
  print(f"estimated peak: {peak / 1e9:.0f} GFLOP/s (best float32 {args.peak_size}^2 matmul in numpy; before / after "
        f"timing: {peaks[0] / 1e9:.0f} / {peaks[1] / 1e9:.0f})")
  warn_if_busy(background, cores)

  results = {}
  for name, seconds in timed.items():
    median = statistics.median(seconds)
    tokens_per_s = n_tokens / median
    results[name] = {"seconds": seconds, "median_s": median, "tokens_per_s": tokens_per_s,
                     "model_flops_per_s": flops_per_token * tokens_per_s,
                     "mfu": flops_per_token * tokens_per_s / peak, "first_loss": first[name],
                     "warmup_metrics": warm["history"][name]}
    print(f"{name}: median {median:.3f} s over {args.steps} steps")
  ratio = results["teacherlm_jax"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]

  figures = {
      **results,
      "ratio": ratio, "target_ratio": TARGET_RATIO, "target_reached": ratio >= TARGET_RATIO,
      "config": {"hidden_size": args.hidden_size, "num_layers": args.num_layers, "num_heads": args.num_heads,
                 "vocab_size": args.vocab_size, "dtype": "float32"},
      "inputs": {"batch_size": args.batch_size, "seq_len": args.seq_len, "tokens": n_tokens},
      "optimizer": {"learning_rate": args.learning_rate, "b1": args.b1, "b2": args.b2, "eps": args.eps,
                    "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm},
      "num_params": num_params, "model_flops_per_token": flops_per_token, "steps": args.steps,
      "warmup": args.warmup, "first_loss_rel_diff": first_diff,
      "param_max_abs_diff_after_step_1": warm["param_max_abs_diff_after_step_1"],
      "compile_and_first_step_s": warm["compile_and_first_step_s"],
      "peak_flops": peak, "peak_flops_before_after": peaks, "peak_size": args.peak_size,
      "scan_layers": model.config.scan_layers, "scan_unroll": model.config.scan_unroll, "peak_method": "best float32 n x n matmul, numpy, all cores",
      "mesh": dict(mesh.shape), "torch_threads": torch.get_num_threads(),
      "cpu": cpu_model(), "cores": cores, "background_cores": background,
      **run_environment(torch, transformers, optax=optax.__version__, numpy=np.__version__),
  }
  publish(figures, format_table(figures), args.json)
  if args.profile:
    profile_step(calls["teacherlm_jax"], hlo_text(), args.profile)
  return 0


if __name__ == "__main__":
  sys.exit(main())
