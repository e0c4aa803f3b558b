"""What a mixture reads, said before it is read: every root, group and file found or skipped, capped counts, rates.

`describe(name, split)` is the JSON-able account (`inspect_task --sources` / `--sources_json`), `log_sources` writes
it to the log at the start of training, and `check_embedded_data` refuses a real model on the embedded samples.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import numpy as np
import seqio
from etils import epath

import tasks
from tasks import config as task_config
from teacherlm_jax.models import common, registry

log = logging.getLogger("teacherlm_jax")
# Models above this many parameters may not train on the embedded samples unless allowed (the tiny configs of the
# tests and the demo are far below it; the smallest published config, BLOOM-560M, is above it).
EMBEDDED_DATA_MAX_PARAMS = 100_000_000
FINGERPRINT_FILE = "teacherlm.json"  # in a prepared cache: what it was made from


def tasks_of(name: str) -> list[seqio.Task]:
  """The tasks of a mixture, or [the task]."""
  provider = tasks.get_mixture_or_task(name)
  return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def members(name: str) -> list[tuple[seqio.Task, float]]:
  """(task, mixing rate) of a mixture, or [(task, 1.0)] of a task (rates may count the data: call it after the
  cache directories are known)."""
  provider = tasks.get_mixture_or_task(name)
  if isinstance(provider, seqio.Mixture):
    return [(task, float(provider.get_rate(task))) for task in provider.tasks]
  return [(provider, 1.0)]


def corpus(task: seqio.Task) -> str | None:
  """The `tasks.config.data_root` corpus a task reads (None: a user dataset naming its files)."""
  return getattr(task.source, "corpus", None)


def num_params(model_config: Any) -> int:
  """The model's parameter count (from shapes only; nothing is allocated)."""
  shapes = jax.eval_shape(lambda: common.init_params(registry.build(model_config), jax.random.key(0)))
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))


def check_embedded_data(name: str, model_config: Any, allow_embedded_data: bool) -> None:
  """Refuses a model above EMBEDDED_DATA_MAX_PARAMS on the samples embedded in the package, naming the flags."""
  if allow_embedded_data:
    return
  embedded = sorted({corpus(task) for task in tasks_of(name) if corpus(task) and
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


def fingerprint(task: seqio.Task) -> dict[str, Any]:
  """What a task's records depend on besides the files: its root, cap, subsample, selection, fields, vocabulary."""
  source = task.source
  return {"task": task.name, "root": source.root(), "cap": source.cap(), "subsample_seed": source.subsample_seed(),
          "selection": [list(part) for part in task_config.selection(source.corpus or "")],
          "flan": [task_config.flan_layout(), task_config.flan_task_field()],
          "teacherdata_fields": task_config.teacherdata_fields(),
          "vocabulary": vocabulary_id(task_config.task_vocabulary())}


def vocabulary_id(vocabulary: seqio.Vocabulary) -> str:
  """A description of a vocabulary that is the same in every process: its class, size and file content."""
  content = getattr(vocabulary, "sha256", None)
  return f"{type(vocabulary).__name__}(size={vocabulary.vocab_size}" + (f", sha256={content})" if content else ")")


def check_cache(task: seqio.Task) -> None:
  """Refuses a missing cache, or one made from another configuration than the current one, naming what differs."""
  if not task.cache_dir:
    raise FileNotFoundError(f"USE_CACHED=True but {task.name} is not cached in CACHE_DIRS "
                            f"{seqio.utils.get_global_cache_dirs()}; run python -m teacherlm_jax.prepare "
                            f"--tasks={task.name} --output_cache_dir=DIR with the same gin files and bindings")
  stored = json.loads((epath.Path(task.cache_dir) / FINGERPRINT_FILE).read_text())
  current = json.loads(json.dumps(fingerprint(task)))
  differ = [f"{key}: cache {stored.get(key)!r} vs now {value!r}" for key, value in current.items()
            if stored.get(key) != value]
  if differ:
    raise ValueError(f"the cache of {task.name} at {task.cache_dir} was made from another configuration "
                     f"({'; '.join(differ)}); prepare it again, or set USE_CACHED=False")


def describe(name: str, split: str = "train", use_cached: bool = False) -> dict[str, Any]:
  """Every task of `name`: its root, layout, groups (files, kept rows, capped count), excluded, metadata and
  unread entries, and its mixing rate; with `use_cached`, its prepared cache's groups and counts (nothing is read
  but the cache's json files)."""
  if use_cached:
    seqio.add_global_cache_dirs(list(task_config.cache_dirs()))
  rows = []
  for task, rate in members(name):
    source = task.source
    entry: dict[str, Any] = {"task": task.name, "rate": rate, "corpus": corpus(task)}
    if use_cached:
      check_cache(task)
      entry.update(_describe_cache(task, split))
    elif hasattr(source, "discover"):
      entry.update(_describe_source(task, source, split))
    rows.append(entry)
  return {"name": name, "split": split, "tasks": rows}


def _describe_cache(task: seqio.Task, split: str) -> dict[str, Any]:
  directory = epath.Path(task.cache_dir)
  made_from = json.loads((directory / FINGERPRINT_FILE).read_text())
  counts = json.loads((directory / f"groups.{split}.json").read_text())
  shards = sorted(str(path) for path in directory.glob(f"{split}.tfrecord-*"))
  cap = made_from["cap"]
  groups = [{"name": group, "files": [], "keep": [], "count": count, "rejects": 0,
             "capped": cap is not None and count >= cap} for group, count in counts.items()]
  return {"root": made_from["root"], "embedded": bool(task.source.corpus) and task_config.embedded_root(
              task.source.corpus), "layout": f"prepared cache {directory} ({len(shards)} shards)", "cap": cap,
          "subsample_seed": made_from["subsample_seed"], "examples": int(task.get_cached_stats(split)["examples"]),
          "cached": True, "groups": groups, "excluded": [], "metadata": [], "unread": []}


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


def log_sources(name: str, split: str = "train", use_cached: bool = False) -> None:
  """Writes `lines(describe(...))` to the log (process 0)."""
  if jax.process_index() == 0:
    for line in lines(describe(name, split, use_cached)):
      log.info("%s", line)

