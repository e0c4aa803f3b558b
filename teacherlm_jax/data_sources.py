"""What a mixture reads, said before it is read: every root, group and file found or skipped, capped counts, rates.

`describe(name, split)` is the JSON-able account (`inspect_task --sources` / `--sources_json`), `log_sources` writes
it to the log at the start of training, and `check_embedded_data` refuses a real model on the embedded samples.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
import seqio

import tasks
from tasks import config as task_config
from teacherlm_jax.models import bloom

log = logging.getLogger("teacherlm_jax")
# Models above this many parameters may not train on the embedded samples unless allowed (the tiny configs of the
# tests and the demo are far below it; the smallest published config, BLOOM-560M, is above it).
EMBEDDED_DATA_MAX_PARAMS = 100_000_000


def members(name: str) -> list[tuple[seqio.Task, float]]:
  """(task, mixing rate) of a mixture, or [(task, 1.0)] of a task."""
  provider = tasks.get_mixture_or_task(name)
  if isinstance(provider, seqio.Mixture):
    return [(task, float(provider.get_rate(task))) for task in provider.tasks]
  return [(provider, 1.0)]


def corpus(task: seqio.Task) -> str | None:
  """The `tasks.config.data_root` corpus a task reads (None: a user dataset naming its files)."""
  return getattr(task.source, "corpus", None)


def num_params(model_config: bloom.BloomConfig) -> int:
  """The model's parameter count (from shapes only; nothing is allocated)."""
  shapes = jax.eval_shape(lambda: bloom.init_params(bloom.Bloom(model_config), jax.random.key(0)))
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))


def check_embedded_data(name: str, model_config: bloom.BloomConfig, allow_embedded_data: bool) -> None:
  """Refuses a model above EMBEDDED_DATA_MAX_PARAMS on the samples embedded in the package, naming the flags."""
  if allow_embedded_data:
    return
  embedded = sorted({corpus(task) for task, _ in members(name) if corpus(task) and
                     task_config.embedded_root(corpus(task))})
  if not embedded:
    return
  params = num_params(model_config)
  if params > EMBEDDED_DATA_MAX_PARAMS:
    bindings = " ".join(f"--gin.data_root.{name}=\"'/path/to/{name}'\"" for name in embedded)
    raise ValueError(f"{name} would train a {params / 1e6:.0f}M-parameter model on the small samples embedded in "
                     f"the package ({', '.join(embedded)}: a few hundred records); bind the real data roots "
                     f"({bindings}; README: Data), or pass --gin.train.allow_embedded_data=True to train on the "
                     "samples anyway")


def describe(name: str, split: str = "train") -> dict[str, Any]:
  """Every task of `name`: its root, layout, groups (files, kept rows, capped count), excluded, metadata and
  unread entries, and its mixing rate."""
  rows = []
  for task, rate in members(name):
    source = task.source
    entry: dict[str, Any] = {"task": task.name, "rate": rate, "corpus": corpus(task)}
    if hasattr(source, "discover"):
      entry.update(_describe_source(task, source, split))
    rows.append(entry)
  return {"name": name, "split": split, "tasks": rows}


def _describe_source(task: seqio.Task, source, split: str) -> dict[str, Any]:
  discovery = source.discover(split)
  cap = source.cap()
  groups = []
  for group in discovery.groups:
    scan = source.scan(group)
    groups.append({"name": group.name, "files": list(group.files), "keep": [list(k) for k in group.keep],
                   "count": scan.count, "rejects": len(scan.rejects), "capped": cap is not None and scan.count >= cap})
  return {"root": discovery.root, "embedded": bool(source.corpus) and task_config.embedded_root(source.corpus),
          "layout": discovery.layout, "cap": cap, "subsample_seed": source.subsample_seed(),
          "examples": sum(group["count"] for group in groups), "cached": bool(task.supports_caching and task.cache_dir),
          "groups": groups, "excluded": list(discovery.excluded), "metadata": list(discovery.metadata),
          "unread": [{"path": path, "why": why} for path, why in discovery.unread]}


def lines(description: dict[str, Any]) -> list[str]:
  """The description as log / terminal lines."""
  out = [f"data: {description['name']} [{description['split']}]"]
  total = sum(task["rate"] for task in description["tasks"]) or 1.0
  for task in description["tasks"]:
    head = f"  {task['task']}: rate {task['rate']:.6g} ({100 * task['rate'] / total:.1f}%)"
    if "root" not in task:
      out.append(head)
      continue
    out.append(f"{head}, {task['examples']} examples, root {task['root']}"
               f"{' (embedded sample)' if task['embedded'] else ''}, layout {task['layout']}, cap {task['cap']}"
               f"{'' if task['subsample_seed'] is None else ', seeded random subsample ' + str(task['subsample_seed'])}")
    for group in task["groups"]:
      keep = f" keep {group['keep']}" if group["keep"] else ""
      flags = (" capped" if group["capped"] else "") + (f", {group['rejects']} rejects" if group["rejects"] else "")
      out.append(f"    group {group['name']}: {group['count']} examples from {len(group['files'])} file(s){keep}"
                 f"{flags}")
    for name in task["excluded"]:
      out.append(f"    excluded {name} (tasks.config.selection)")
    for path in task["metadata"]:
      out.append(f"    metadata, not read: {path}")
    for entry in task["unread"]:
      out.append(f"    SKIPPED {entry['path']}: {entry['why']} (on_unread='skip')")
  return out


def log_sources(name: str, split: str = "train") -> None:
  """Writes `lines(describe(...))` to the log (process 0)."""
  if jax.process_index() == 0:
    for line in lines(describe(name, split)):
      log.info("%s", line)

