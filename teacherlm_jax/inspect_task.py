"""Shows what the model sees for a seqio task or mixture: rendered examples, token counts and truncation.

  python -m teacherlm_jax.inspect_task --task teacherlm_stage2_personalization --split train --n 3 \
      [--feature_lengths inputs=1024,targets=1024] [--stats_examples 1000] [--gin_file=gin/models/tiny.gin] \
      [--gin.data_root.teacherdata_2m="'/data/teacherdata'"]
  python -m teacherlm_jax.inspect_task --task teacherlm_stage1_multitask --sources [--sources_json sources.json] \
      --gin.data_root.p3_sense_3k="'/data/P3'"

--sources prints what training logs first: every root, its layout, the groups with their files and capped counts,
what is excluded, metadata and skipped entries, and the mixing rates; --sources_json writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable, Optional

import numpy as np

import tasks
from tasks import config as task_config
from teacherlm_jax import data_sources, gin_utils


def parse_lengths(text: str) -> dict[str, int]:
  """'inputs=512,targets=256' -> {'inputs': 512, 'targets': 256}."""
  lengths = {}
  for item in filter(None, text.split(",")):
    name, _, value = item.partition("=")
    if not value.isdigit():
      raise ValueError(f"bad feature length {item!r}; expected NAME=INT")
    lengths[name.strip()] = int(value)
  return lengths


def token_stats(examples: Iterable[dict], lengths: dict[str, int]) -> dict[str, dict[str, float]]:
  """Per feature: examples counted, mean / max / 95th-percentile token count, and how many exceed the length."""
  counts: dict[str, list[int]] = {name: [] for name in lengths}
  for example in examples:
    for name in lengths:
      if name in example:
        counts[name].append(len(example[name]))
  stats = {}
  for name, values in counts.items():
    values = np.asarray(values or [0])
    stats[name] = {"examples": len(counts[name]), "mean": float(values.mean()), "p95": float(np.percentile(values, 95)),
                   "max": int(values.max()), "length": lengths[name],
                   "truncated": int((values > lengths[name]).sum())}
  return stats


def describe(name: str, split: str, n: int, lengths: dict[str, int], stats_examples: int,
             seed: Optional[int] = 0) -> str:
  """The report `inspect_task` prints."""
  provider = tasks.get_mixture_or_task(name)
  dataset = provider.get_dataset(sequence_length=None, split=split, shuffle=True, seed=seed, num_epochs=1,
                                 trim_output_features=False)
  examples = list(dataset.take(max(n, stats_examples)).as_numpy_iterator())
  vocabulary = task_config.task_vocabulary()
  lines = [f"{name} [{split}] vocabulary: {vocabulary}"]
  for i, example in enumerate(examples[:n]):
    lines.append(f"--- example {i}" + (f" ({example['example_id'].decode()})" if "example_id" in example else ""))
    for feature in ("inputs", "targets"):
      if feature in example:
        pretokenized = example.get(f"{feature}_pretokenized")  # mixtures keep only the token ids
        text = pretokenized.decode("utf-8") if pretokenized is not None else vocabulary.decode(
            example[feature].tolist())
        lines.append(f"{feature} ({len(example[feature])} tokens): {text}")
  lines.append(f"--- token counts over {len(examples)} examples")
  for feature, row in token_stats(examples, lengths).items():
    lines.append(f"{feature:8s} mean {row['mean']:.1f}  p95 {row['p95']:.0f}  max {row['max']}  "
                 f"> {row['length']}: {row['truncated']} truncated")
  return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
  gin_files, bindings, rest = gin_utils.split_gin_args(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(prog="python -m teacherlm_jax.inspect_task", description=__doc__.split("\n")[0])
  parser.add_argument("--task", required=True, help="a registered seqio task or mixture")
  parser.add_argument("--split", default="train")
  parser.add_argument("--n", type=int, default=3, help="examples to print")
  parser.add_argument("--feature_lengths", default="inputs=1024,targets=1024")
  parser.add_argument("--stats_examples", type=int, default=1000, help="examples to compute token counts over")
  parser.add_argument("--sources", action="store_true", help="print the roots, groups, files, counts and rates")
  parser.add_argument("--sources_json", help="write the --sources account as JSON to this file")
  args = parser.parse_args(rest)
  gin_utils.parse_gin(gin_files, bindings)
  if args.sources or args.sources_json:
    account = data_sources.describe(args.task, args.split)
    if args.sources_json:
      with open(args.sources_json, "w", encoding="utf-8") as handle:
        json.dump(account, handle, indent=1, ensure_ascii=False)
    print("\n".join(data_sources.lines(account)))
    return 0
  print(describe(args.task, args.split, args.n, parse_lengths(args.feature_lengths), args.stats_examples))
  return 0


if __name__ == "__main__":
  sys.exit(main())
