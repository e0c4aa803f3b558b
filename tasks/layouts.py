"""The training corpora's published on-disk layouts: which files under a root make which groups of a split.

P3 (bigscience/P3), one group per prompt, `inputs_pretokenized` / `targets_pretokenized` (or `inputs` / `targets`):
  parquet     <root>/<prompt>/<split>-00000-of-00001.parquet                  the hub's layout today
  tfrecord    <root>/data/<prompt>/<split>.tfrecord-00000-of-00001 (+ info.<split>.json, stats.<split>.json)
              the older revisions (seqio caches); `<root>` may also be the `data/` folder itself
  jsonl       <root>/<prompt>/<split>.jsonl
Flan 2021 / Muffin, one group per task, `inputs` / `targets`:
  table       <root>/[<split>/][*/]<split>-*.parquet, <split>.jsonl or <split>-*.jsonl with a task column
              (`task_name`; the Flan 2021 submix): one group per task name
  task files  <root>/<split>/<task>_10templates.jsonl (or any <root>/<split>/<task>.jsonl): one group per file
  task dirs   <root>/<task>/<split>.jsonl, <split>.tfrecord*, <split>-*.parquet
TeacherData, one group: <root>/<split>.jsonl, <split>-*.jsonl, <split>-*.parquet, <split>.parquet, <split>.tfrecord*

Every entry under a root is accounted for: read (a group), excluded (by the corpus' `include` / `exclude` globs
of `tasks.config.selection`), metadata (README, licences, loading scripts, seqio info/stats; listed), or unread.
An unread folder or file is an error naming it, or with `tasks.config.unread_policy(on_unread='skip')` a skip that
the log lists. A P3 `*_score_eval` prompt repeats every example once per answer choice; when included, its group
keeps only the rows whose `is_correct` is true.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
from typing import Optional

import tensorflow as tf

from tasks import config, sources
from tasks.sources import Discovery, Group, list_files

METADATA = ("README*", "LICENSE*", "*.md", ".gitattributes", ".gitignore", "*.py", "info.*.json", "stats.*.json",
            "COMPLETED", "dataset_info.json", "dataset_infos.json", "state.json", "*.lock")
SCORE_EVAL = "*_score_eval"


class UnreadEntry(FileNotFoundError):
  """A folder or file under a root that no reader of its corpus reads."""


def _entries(directory: str) -> list[tuple[str, bool]]:
  """(path, is_dir) of a directory's entries, sorted."""
  return [(os.path.join(directory, name.rstrip("/")), tf.io.gfile.isdir(os.path.join(directory, name.rstrip("/"))))
          for name in sorted(tf.io.gfile.listdir(directory))]


def _is_metadata(path: str) -> bool:
  return any(fnmatch.fnmatch(os.path.basename(path), pattern) for pattern in METADATA)


def _selected(corpus: str, name: str) -> bool:
  include, exclude = config.selection(corpus)
  return any(fnmatch.fnmatch(name, p) for p in include) and not any(fnmatch.fnmatch(name, p) for p in exclude)


def _unread(path: str, why: str, unread: list[tuple[str, str]]) -> None:
  if config.unread_policy() == "raise":
    raise UnreadEntry(f"{path}: {why}; point the corpus' data_root at one of the layouts of tasks.layouts, remove "
                      "it, or bind tasks.config.unread_policy.on_unread='skip' to skip it (the log lists it)")
  unread.append((path, why))


def _split_files(directory: str, split: str) -> list[str]:
  """A folder's files of `split` in any readable format (the P3 and per-task-directory layouts)."""
  patterns = (f"{split}.jsonl", f"{split}-*.jsonl", f"{split}.tfrecord*", f"{split}-*.parquet", f"{split}.parquet")
  return sorted({path for pattern in patterns for path in list_files(os.path.join(directory, pattern))})


def _readable(path: str) -> bool:
  name = os.path.basename(path)
  return name.endswith((".jsonl", ".parquet")) or ".tfrecord" in name


# ---------------------------------------------------------------------------------------------------- P3


def p3(root: str, split: str) -> Discovery:
  """P3 prompts under `root` (any of its three layouts); see the module docstring."""
  base = os.path.join(root, "data") if tf.io.gfile.isdir(os.path.join(root, "data")) else root
  return _per_directory("p3_sense_3k", root, base, split, "p3", keep_correct=True)


def _per_directory(corpus: str, root: str, base: str, split: str, prefix: str, keep_correct: bool) -> Discovery:
  groups, excluded, metadata, unread = [], [], [], []
  for path, is_dir in _entries(base):
    name = os.path.basename(path)
    if not is_dir:
      (metadata.append(path) if _is_metadata(path) else _unread(path, "a file beside the group folders", unread))
      continue
    inside = _entries(path)
    if not any(not d and _readable(p) for p, d in inside):
      _unread(path, "a folder without .jsonl, .parquet or .tfrecord* files", unread)
      continue
    for other, other_is_dir in inside:
      if other_is_dir or not (_readable(other) or _is_metadata(other)):
        _unread(other, "neither a .jsonl, .parquet or .tfrecord* file nor metadata", unread)
    if not _selected(corpus, name):
      excluded.append(name)
      continue
    files = _split_files(path, split)
    if files:
      keep = (("is_correct", True),) if keep_correct and fnmatch.fnmatch(name, SCORE_EVAL) else ()
      groups.append(Group(f"{prefix}/{name}", tuple(files), keep))
  layout = _layout_name(groups)
  return Discovery(root, layout, tuple(groups), tuple(excluded), tuple(metadata), tuple(unread))


def _layout_name(groups: list[Group]) -> str:
  kinds = sorted({_kind(path) for group in groups for path in group.files})
  return "+".join(kinds) if kinds else "empty"


def _kind(path: str) -> str:
  name = os.path.basename(path)
  return "parquet" if name.endswith(".parquet") else ("jsonl" if name.endswith(".jsonl") else "tfrecord")


# ----------------------------------------------------------------------------------------------- Flan 2021


def flan(root: str, split: str) -> Discovery:
  """Flan 2021 / Muffin tasks under `root`: a table with a task column, per-task files, or per-task folders."""
  layout = config.flan_layout()
  if layout == "auto":
    layout = _detect_flan_layout(root, split)
  if layout == "table":
    return _flan_table(root, split)
  if layout == "task_files":
    return _flan_task_files(root, split)
  if layout == "task_dirs":
    return _per_directory("muffin_3w", root, root, split, "muffin", keep_correct=False)
  raise ValueError(f"flan_layout={layout!r}; expected 'auto', 'table', 'task_files' or 'task_dirs'")


def _detect_flan_layout(root: str, split: str) -> str:
  if _table_files(root, split):
    return "table"
  if tf.io.gfile.isdir(os.path.join(root, split)) and list_files(os.path.join(root, split, "*.jsonl")):
    return "task_files"
  return "task_dirs"


def _table_files(root: str, split: str) -> list[str]:
  """A Flan table's files of `split`: <split>[-*].{parquet,jsonl} in the root, its data/ or <split>/ folder, and any
  Parquet file in <split>/."""
  patterns = [f"{split}-*.parquet", f"{split}.parquet", f"{split}.jsonl", f"{split}-*.jsonl"]
  directories = [root, os.path.join(root, "data"), os.path.join(root, split)]
  files = {path for directory in directories for pattern in patterns
           for path in list_files(os.path.join(directory, pattern))}
  return sorted(files | set(list_files(os.path.join(root, split, "*.parquet"))))


def _flan_table(root: str, split: str) -> Discovery:
  files = _table_files(root, split)
  field = config.flan_task_field()
  names = sorted({name for path in files for name in _column_values(path, field)})
  groups, excluded = [], []
  for name in names:
    if not _selected("muffin_3w", name):
      excluded.append(name)
      continue
    groups.append(Group(f"muffin/{name}", tuple(files), ((field, name),)))
  return Discovery(root, "table", tuple(groups), tuple(excluded))


@functools.lru_cache(maxsize=None)
def _column_values(path: str, field: str) -> frozenset[str]:
  """The distinct values of a table file's task column (an error naming the file if it has none)."""
  if path.endswith(".parquet"):
    table = sources.open_parquet(path)
    if field not in table.schema_arrow.names:
      raise ValueError(f"{path}: no column {field!r} (columns {table.schema_arrow.names}); bind "
                       "tasks.config.flan_task_field.field to the task column")
    return frozenset(str(value) for value in table.read(columns=[field]).column(field).unique().to_pylist())
  values = set()
  with tf.io.gfile.GFile(path, "rb") as handle:
    for number, line in enumerate(handle, start=1):
      if line.strip():
        record = _json_object(path, number, line)
        if field not in record:
          raise ValueError(f"{path} line {number}: no field {field!r}; bind tasks.config.flan_task_field.field")
        values.add(str(record[field]))
  return frozenset(values)


def _json_object(path: str, number: int, line: bytes) -> dict:
  try:
    record = json.loads(line)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{path} line {number}: invalid JSON ({error})") from None
  if not isinstance(record, dict):
    raise ValueError(f"{path} line {number}: expected a JSON object")
  return record


TASK_FILE = re.compile(r"(.+?)(_10templates)?\.jsonl$")


def _flan_task_files(root: str, split: str) -> Discovery:
  directory = os.path.join(root, split)
  groups, excluded, unread = [], [], []
  for path, is_dir in _entries(directory):
    match = TASK_FILE.fullmatch(os.path.basename(path))
    if is_dir or not match:
      _unread(path, "not a <task>_10templates.jsonl file", unread)
      continue
    if not _selected("muffin_3w", match.group(1)):
      excluded.append(match.group(1))
      continue
    groups.append(Group(f"muffin/{match.group(1)}", (path,)))
  return Discovery(root, "task_files", tuple(groups), tuple(excluded), (), tuple(unread))


# --------------------------------------------------------------------------------------------- TeacherData


def single_group(root: str, split: str, prefix: Optional[str] = None) -> Discovery:
  """All of a corpus' files of `split` directly under `root` as one group (TeacherData). A root that is a file or a
  glob (e.g. an annotation run's `annotated.jsonl`) is the train split, and there is no other split."""
  name = prefix or os.path.basename(root.rstrip("/"))
  if any(char in root for char in "*?[") or (not tf.io.gfile.isdir(root) and tf.io.gfile.exists(root)):
    files = [path for path in list_files(root) if _readable(path)] if split == "train" else []
    return Discovery(root, _layout_name([Group("", tuple(files))]), (Group(f"{name}/{split}", tuple(files)),))
  files = _split_files(root, split)
  return Discovery(root, _layout_name([Group("", tuple(files))]), (Group(f"{name}/{split}", tuple(files)),))


sources.CACHES.append(_column_values.cache_clear)
