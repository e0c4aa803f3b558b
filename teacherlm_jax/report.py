"""The TeacherLM report: Markdown plus PNG plots, generated from run directories.

  python -m teacherlm_jax.report --run_dir outputs/demo [--run_dir ...] [--out outputs/demo/report]

Everything is found by walking the run directories:
  training runs (a curriculum stage, a student stage)   TensorBoard event files -> loss curves (training_curves.png)
  annotation runs (summary.json + annotated.jsonl)      annotation lengths and rejects (annotation_lengths.png)
  student runs (students_results.json)                  accuracy per task and variant (student_accuracy.png)
  evaluations (eval_results.json)                       one table row per task
  learning by teaching (scores.jsonl, rounds.json)      LbT score distribution and accuracy per round (lbt.png)
  LbT's selection_report.json, m2.json, m3.json         selection accuracies, M2 before/after, M3 rounds (tables)
The report is `report.md` with the plots next to it (default: <first run_dir>/report/).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Any, Iterator, Optional, Sequence

import matplotlib
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from etils import epath  # noqa: E402

ANNOTATION_FIELDS = ("fundamental", "cot", "error")


def _walk(run_dirs: Sequence[str], name_test) -> Iterator[epath.Path]:
  for run_dir in run_dirs:
    found = [epath.Path(root) / name for root, _, files in tf.io.gfile.walk(run_dir) for name in files
             if name_test(name)]
    yield from sorted(found, key=str)


def loss_curves(run_dirs: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
  """{training run directory (relative): [(step, loss)]} from the TensorBoard event files."""
  curves = collections.defaultdict(list)
  for path in _walk(run_dirs, lambda name: name.startswith("events.out.tfevents")):
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      event = tf.compat.v1.Event.FromString(raw)
      for value in event.summary.value:
        if value.tag == "loss":
          curves[_label(path.parent, run_dirs)].append((int(event.step), float(tf.make_ndarray(value.tensor))))
  return {name: sorted(points) for name, points in sorted(curves.items())}


def _label(path: epath.Path, run_dirs: Sequence[str]) -> str:
  for run_dir in run_dirs:
    relative = os.path.relpath(str(path), run_dir)
    if not relative.startswith(".."):
      return relative
  return str(path)


def annotation_stats(run_dirs: Sequence[str]) -> dict[str, dict]:
  """{annotation output dir: {summary, lengths: {field: [words]}}}."""
  stats = {}
  for summary_path in _walk(run_dirs, lambda name: name == "summary.json"):
    annotated = summary_path.parent / "annotated.jsonl"
    if not annotated.exists():
      continue
    lengths = collections.defaultdict(list)
    with annotated.open() as handle:
      for line in handle:
        record = json.loads(line)
        for field in ANNOTATION_FIELDS:
          if field in record:
            lengths[field].append(len(record[field].split()))
    stats[_label(summary_path.parent, run_dirs)] = {"summary": json.loads(summary_path.read_text()),
                                                    "lengths": dict(lengths)}
  return stats


def student_results(run_dirs: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
  return {_label(path.parent, run_dirs): json.loads(path.read_text())
          for path in _walk(run_dirs, lambda name: name == "students_results.json")}


def eval_results(run_dirs: Sequence[str]) -> dict[str, dict]:
  return {_label(path.parent, run_dirs): json.loads(path.read_text())
          for path in _walk(run_dirs, lambda name: name == "eval_results.json")}


def lbt_results(run_dirs: Sequence[str]) -> tuple[dict[str, list[float]], dict[str, list[dict]]]:
  """({scores.jsonl's run: LbT scores}, {rounds.json's run: per-round log})."""
  scores = {_label(path.parent, run_dirs): [json.loads(line)["lbt_score"] for line in path.read_text().splitlines()]
            for path in _walk(run_dirs, lambda name: name == "scores.jsonl")}
  rounds = {_label(path.parent, run_dirs): json.loads(path.read_text())
            for path in _walk(run_dirs, lambda name: name == "rounds.json")}
  return scores, rounds


def lbt_methods(run_dirs: Sequence[str]) -> dict[str, dict[str, dict]]:
  """{kind: {run: log}} for LbT's selection reports, M2 and M3 logs (`lbt report`, `lbt m2`, `lbt refine`)."""
  files = {"selection": "selection_report.json", "m2": "m2.json", "m3": "m3.json"}
  return {kind: {_label(path.parent, run_dirs): json.loads(path.read_text())
                 for path in _walk(run_dirs, lambda name, file=file: name == file)} for kind, file in files.items()}


def _lbt_methods_markdown(logs: dict[str, dict[str, Any]]) -> list[str]:
  lines = []
  for run, selection in logs["selection"].items():
    methods = [m for m in next(iter(selection["student_sets"].values())) if not m.startswith("mean_")]
    lines += ["", f"`{run}` answer selection ({selection['problems']} teaching problems, accuracy against their gold)",
              "", "| students | " + " | ".join(methods) + " | mean lbt_gain |", "|---" * (len(methods) + 2) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in methods) + f" | {values['mean_lbt_gain']:+.4f} |"
              for name, values in selection["student_sets"].items()]
  for run, result in logs["m2"].items():
    lines += ["", f"`{run}` M2: the teacher's held-out accuracy {result['before']:.4f} before DPO", "",
              "| pairs from | pairs | accuracy after |", "|---|---|---|"]
    lines += [f"| {pairing} | {entry['pairs']} | {entry['after']:.4f} |" for pairing, entry in result["pairings"].items()]
  for run, history in logs["m3"].items():
    lines += ["", f"`{run}` M3 exemplar refinement", "", "| round | students' exam accuracy | teacher's few-shot "
              "held-out accuracy | replaced |", "|---|---|---|---|"]
    lines += [f"| {e['round']} | {e['exam_accuracy']:.4f} | {e['held_out_accuracy']:.4f} | "
              + (f"{e['replaced']['old']} -> {e['replaced']['new']}" if e["replaced"] else "") + " |" for e in history]
  return lines


def plot_lbt(scores: dict[str, list[float]], rounds: dict[str, list[dict]], path: epath.Path) -> None:
  """Left: the distribution of LbT scores per scoring run; right: mean LbT score and held-out accuracy per round."""
  figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  for run, values in scores.items():
    left.hist(values, bins=np.linspace(0, 1, 11), alpha=0.5, label=run)
  left.set(xlabel="LbT score (students' exam accuracy)", ylabel="candidates", title="LbT score distribution")
  left.legend(fontsize=7)
  for run, history in rounds.items():
    numbers = [entry["round"] for entry in history]
    right.plot(numbers, [entry["mean_lbt_score"] for entry in history], marker="o", label=f"{run}: mean LbT score")
    held_out = [entry.get("held_out_accuracy") for entry in history]
    if all(value is not None for value in held_out):
      right.plot(numbers, held_out, marker="s", label=f"{run}: held-out accuracy")
  right.set(xlabel="round", ylabel="accuracy", ylim=(0, 1), title="Learning by teaching, per round")
  right.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(str(path), dpi=100)
  plt.close(figure)


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: epath.Path) -> None:
  """One panel per top-level directory (the curriculum, the students, ...), one line per training run."""
  groups = collections.defaultdict(dict)
  for name, points in curves.items():
    group, _, rest = name.partition("/")
    groups[group if rest else "."][rest or name] = points
  figure, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
  for axis, (group, runs) in zip(axes[0], sorted(groups.items())):
    for name, points in runs.items():
      axis.plot([s for s, _ in points], [loss for _, loss in points], marker=".", label=name)
    axis.set(xlabel="step", ylabel="training loss (mean over loss tokens)", title=f"Training curves: {group}")
    axis.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(str(path), dpi=100)
  plt.close(figure)


def plot_accuracy(results: dict[str, dict[str, float]], path: epath.Path) -> None:
  variants = list(results)
  tasks = sorted({task for accuracies in results.values() for task in accuracies})
  figure, axis = plt.subplots(figsize=(8, 4.5))
  width = 0.8 / max(len(variants), 1)
  for i, variant in enumerate(variants):
    axis.bar(np.arange(len(tasks)) + i * width, [results[variant].get(task, 0.0) for task in tasks], width,
             label=variant)
  axis.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, fontsize=8)
  axis.set(ylabel="accuracy", ylim=(0, 1), title="Students: accuracy per task and variant")
  axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(str(path), dpi=100)
  plt.close(figure)


def plot_lengths(stats: dict[str, dict], path: epath.Path) -> None:
  figure, axis = plt.subplots(figsize=(8, 4.5))
  for run, entry in stats.items():
    for field, lengths in entry["lengths"].items():
      axis.hist(lengths, bins=20, alpha=0.5, label=f"{run}: {field}")
  axis.set(xlabel="annotation length (words)", ylabel="records", title="Annotation lengths")
  axis.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(str(path), dpi=100)
  plt.close(figure)


def _lbt_markdown(scores: dict[str, list[float]], rounds: dict[str, list[dict]], logs: dict[str, dict[str, Any]]
                  ) -> list[str]:
  if not (scores or rounds):
    return []
  lines = ["## Learning by teaching", "", "![LbT](lbt.png)", "", "| scoring run | candidates | mean LbT score |",
           "|---|---|---|"]
  lines += [f"| {run} | {len(values)} | {np.mean(values):.4f} |" for run, values in scores.items()]
  for run, history in rounds.items():
    lines += ["", f"`{run}` rounds", "", "| round | mean LbT score | held-out accuracy | DPO reward margin |",
              "|---|---|---|---|"]
    for entry in history:
      held_out = entry.get("held_out_accuracy")
      margin = entry.get("dpo", {}).get("reward_margin")
      lines.append(f"| {entry['round']} | {entry['mean_lbt_score']:.4f} | "
                   f"{'' if held_out is None else f'{held_out:.4f}'} | {'' if margin is None else f'{margin:.4f}'} |")
  return lines + _lbt_methods_markdown(logs) + [""]


def _markdown(curves, stats, students, evals) -> list[str]:
  lines = ["# TeacherLM report", ""]
  if students:
    lines += ["## Students", "", "![student accuracy](student_accuracy.png)", ""]
    for run, results in students.items():
      tasks = sorted({t for accuracies in results.values() for t in accuracies})
      lines += [f"`{run}`", "", "| variant | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
      lines += [f"| {variant} | " + " | ".join(f"{accuracies.get(t, float('nan')):.4f}" for t in tasks) + " |"
                for variant, accuracies in results.items()]
      lines.append("")
  if curves:
    lines += ["## Training curves", "", "![training curves](training_curves.png)", "",
              "| run | steps | first loss | last loss |", "|---|---|---|---|"]
    lines += [f"| {name} | {points[-1][0]} | {points[0][1]:.3f} | {points[-1][1]:.3f} |"
              for name, points in curves.items()]
    lines.append("")
  if stats:
    lines += ["## Annotation", "", "![annotation lengths](annotation_lengths.png)", "",
              "| run | records | annotated | rejected | truncated prompts | mean words per field | rejects |",
              "|---|---|---|---|---|---|---|"]
    for run, entry in stats.items():
      summary = entry["summary"]
      means = ", ".join(f"{f} {np.mean(v):.1f}" for f, v in entry["lengths"].items() if v)
      kinds = "; ".join(f"{kind}: {count}" for kind, count in summary["reject_kinds"].items()) or "none"
      lines.append(f"| {run} | {summary['records']} | {summary['annotated']} | {summary['rejected']} | "
                   f"{summary['truncated_prompts']} | {means} | {kinds} |")
    lines.append("")
  if evals:
    lines += ["## Evaluations", "", "| run | task | split | examples | accuracy |", "|---|---|---|---|---|"]
    for run, result in evals.items():
      lines += [f"| {run} | {task} | {value['split']} | {value['examples']} | {value['accuracy']:.4f} |"
                for task, value in result["tasks"].items()]
    lines.append("")
  return lines


def write_report(*run_dirs: str, out: Optional[str] = None) -> str:
  """Writes report.md and its plots; returns the path of report.md."""
  if not run_dirs:
    raise ValueError("give at least one run directory")
  out_dir = epath.Path(out or os.path.join(run_dirs[0], "report"))
  out_dir.mkdir(parents=True, exist_ok=True)
  curves, stats = loss_curves(run_dirs), annotation_stats(run_dirs)
  students, evals = student_results(run_dirs), eval_results(run_dirs)
  lbt_scores, lbt_rounds = lbt_results(run_dirs)
  if lbt_scores or lbt_rounds:
    plot_lbt(lbt_scores, lbt_rounds, out_dir / "lbt.png")
  if curves:
    plot_curves(curves, out_dir / "training_curves.png")
  if stats:
    plot_lengths(stats, out_dir / "annotation_lengths.png")
  if students:
    plot_accuracy(next(iter(students.values())), out_dir / "student_accuracy.png")
  if not (curves or stats or students or evals or lbt_scores or lbt_rounds):
    raise FileNotFoundError(f"nothing to report under {list(run_dirs)}: no training, annotation, student, "
                            "evaluation or LbT runs found")
  lines = _markdown(curves, stats, students, evals) + _lbt_markdown(lbt_scores, lbt_rounds, lbt_methods(run_dirs))
  (out_dir / "report.md").write_text("\n".join(lines))
  return str(out_dir / "report.md")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m teacherlm_jax.report", description=__doc__.split("\n")[0])
  parser.add_argument("--run_dir", action="append", required=True, help="a run directory (repeatable)")
  parser.add_argument("--out", default=None, help="where report.md and the plots go (default: <run_dir>/report)")
  args = parser.parse_args(argv)
  print(write_report(*args.run_dir, out=args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
