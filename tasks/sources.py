"""seqio data sources that read records from files with native tf.data readers and render them in Python.

A `RenderedSource` has, per split, one or more *groups* (a P3 prompt, a Flan task, or the one file set of a corpus).
A group is a list of files (read in name order) and optional row filters (`Group.keep`: a Flan table's `task_name`,
a score_eval prompt's `is_correct`). Reading, per file:

  JSONL      tf.data.TextLineDataset               (record number = 1-based line)
  TFRecord   tf.data.TFRecordDataset               (1-based record; `tf.train.Example`s)
  Parquet    one pyarrow row group at a time       (1-based row)
  CSV        the whole file (the MMLU files)       (the line where the row starts)

then batches of raw records are decoded, validated and rendered into string features by one Python call per batch
(`tf.py_function`; the prompt formats live in `tasks.rendering`). Rendering is a pure function of the record, so
the pipeline is checkpointable (`tf.train.Checkpoint` of its iterator: `teacherlm_jax.input_pipeline`).

Caps: at most `cap` valid records per group, either the first ones in file order (`subsample_seed=None`) or a seeded
random subsample (the `cap` records with the smallest hash of (seed, file name, record number)); both are fixed by a
*scan* of the group, which also gives the group sizes, the per-file counts and the bad records. A capped group keeps
the same records however it is sharded. Scans are cached per process and, with `persisted_scans(directory)` (the
trainer uses MODEL_DIR/data_stats), on disk, keyed by the task, the group, the cap, the policy and each file's size
and modification time: a restart reads no record to count them. Prepared caches (`teacherlm_jax.prepare`) need no
scan at all.

Host sharding (`seqio.ShardInfo`): the (group, file) pairs are dealt to the shards in order when there are at least
as many as shards, so a host opens only its files; otherwise every host reads the capped records and keeps every
`num_shards`-th of each group. With `shuffle`, the files of a group are read in a seeded order that changes every
epoch. Groups are interleaved by `tf.data.Dataset.sample_from_datasets` with weights proportional to their capped
sizes. Bad records follow `config.bad_record_policy()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import heapq
import json
import logging
import os
import tempfile
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import seqio
import tensorflow as tf

from tasks import config, formats

Render = Callable[[formats.Location, formats.Record], dict[str, str]]
RENDER_BATCH = 256
VALID, BAD, SKIPPED = 0, 1, 2  # a rendered record's status; SKIPPED: blank line, or not kept by the group's filter
KEY_BUCKETS = 2**62
CACHES: list[Callable[[], None]] = []  # cache_clear functions of per-process caches over the data (clear_scan_cache)
_STATE = {"scan_dir": None, "rendered": 0}  # where scans persist; raw records rendered by this process
_RENDERED_LOCK = threading.Lock()  # batches are rendered on several tf.data threads at once


@dataclasses.dataclass(frozen=True)
class Group:
  """One capped unit of a source: a name, its files (read in order) and the rows it keeps.

  Attributes:
    name: e.g. 'p3/<prompt>' or 'flan/<task_name>'.
    files: the files, in reading order.
    keep: (field, value) pairs; a record is part of the group only if record[field] == value for each (rows of a
      table with a task column, the correct rows of a score_eval prompt). Other records are not rejects.
  """

  name: str
  files: tuple[str, ...]
  keep: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Discovery:
  """What a root holds for one split: the groups, and every entry that is not read, with the reason."""

  root: str
  layout: str
  groups: tuple[Group, ...]
  excluded: tuple[str, ...] = ()
  metadata: tuple[str, ...] = ()
  unread: tuple[tuple[str, str], ...] = ()  # (path, why); only present with on_unread='skip'

  def as_json(self) -> dict:
    return {"root": self.root, "layout": self.layout,
            "groups": [{"name": group.name, "files": list(group.files), "keep": [list(k) for k in group.keep]}
                       for group in self.groups],
            "excluded": list(self.excluded), "metadata": list(self.metadata),
            "unread": [{"path": path, "why": why} for path, why in self.unread]}


@dataclasses.dataclass(frozen=True)
class ScanResult:
  """A group's capped valid-record count, the count per file, the subsample threshold and the bad records."""

  count: int
  per_file: tuple[int, ...]
  threshold: Optional[int]
  rejects: tuple[formats.BadRecord, ...]


def list_files(pattern: str) -> list[str]:
  """Sorted files matching a glob (local or gs://)."""
  return sorted(tf.io.gfile.glob(pattern))


def file_kind(path: str) -> str:
  """'jsonl', 'tfrecord', 'parquet' or 'csv', from the file name."""
  name = os.path.basename(path)
  for suffix, kind in ((".jsonl", "jsonl"), (".parquet", "parquet"), (".csv", "csv")):
    if name.endswith(suffix):
      return kind
  if ".tfrecord" in name:
    return "tfrecord"
  raise ValueError(f"{path}: unknown format (expected .jsonl, .parquet, .csv or .tfrecord*)")


# ------------------------------------------------------------------------------------------------ raw records


def _raw_records(path: tf.Tensor, kind: str, csv_columns: tuple[str, ...],
                 keep: tuple[tuple[str, Any], ...] = ()) -> tf.data.Dataset:
  """{"raw": bytes, "number": int64} of one file: a JSONL line, a serialized Example, or a JSON-encoded row (of a
  Parquet file, only the rows that `keep` selects: a Flan table is filtered per row group before it is decoded)."""
  if kind == "jsonl":
    raw = tf.data.TextLineDataset(path)
  elif kind == "tfrecord":  # a corrupted file ends at the corruption (the scan reports it: `corruption`)
    raw = tf.data.TFRecordDataset(path).ignore_errors()
  elif kind == "parquet":
    groups = tf.py_function(lambda p: open_parquet(p.numpy().decode()).num_row_groups, [path], tf.int64)
    read = functools.partial(_parquet_row_group, keep=keep)
    rows = tf.data.Dataset.range(groups).map(lambda index: _vectors(read, path, index))
    return rows.unbatch().map(lambda raw, number: {"raw": raw, "number": number})
  elif kind == "csv":
    rows = tf.data.Dataset.from_tensors(path).map(
        lambda p: _vectors(functools.partial(_csv_rows, columns=csv_columns), p))
    return rows.unbatch().map(lambda raw, number: {"raw": raw, "number": number})
  else:
    raise ValueError(f"unknown file kind {kind!r}")
  return raw.enumerate(start=1).map(lambda number, record: {"raw": record, "number": number})


def _vectors(function: Callable, *args) -> tuple[tf.Tensor, tf.Tensor]:
  """(raw strings, record numbers) of a py_function reader, with their [n] shapes."""
  raw, numbers = tf.py_function(function, list(args), (tf.string, tf.int64))
  raw.set_shape([None])
  numbers.set_shape([None])
  return raw, numbers


def open_parquet(path: str) -> pq.ParquetFile:
  """A Parquet file, local or remote (gs://, s3://, hdfs:// through pyarrow's file systems)."""
  if "://" not in path:
    return pq.ParquetFile(path)
  filesystem, inner = pafs.FileSystem.from_uri(path)
  return pq.ParquetFile(filesystem.open_input_file(inner))


def _parquet_row_group(path: tf.Tensor, index: tf.Tensor, keep: tuple[tuple[str, Any], ...] = ()
                       ) -> tuple[np.ndarray, np.ndarray]:
  """The (kept) rows of one row group as JSON objects {"r": row}, and their 1-based row numbers in the file."""
  parquet = open_parquet(path.numpy().decode())
  index = int(index)
  first = sum(parquet.metadata.row_group(i).num_rows for i in range(index)) + 1
  table = parquet.read_row_group(index)
  numbers = np.arange(first, first + table.num_rows, dtype=np.int64)
  for field, value in keep:
    if field in table.column_names:
      try:
        mask = pc.equal(table[field], pa.scalar(value)).fill_null(False)
      except pa.ArrowException:
        continue  # another type: the renderer's own check (_kept) decides
      table, numbers = table.filter(mask), numbers[np.asarray(mask)]
  encoded = [json.dumps({"r": row}, ensure_ascii=False, default=_json_default) for row in table.to_pylist()]
  return np.array(encoded, dtype=object), numbers


def _json_default(value):
  if isinstance(value, (bytes, bytearray)):
    return value.decode("utf-8", errors="replace")
  return str(value)


def _csv_rows(path: tf.Tensor, columns: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
  """The rows of a header-less CSV as JSON {"r": record} or {"bad": [field, reason]}, and their line numbers."""
  encoded, numbers = [], []
  for location, record in formats.iter_csv(path.numpy().decode(), columns):
    if isinstance(record, formats.BadRecord):
      encoded.append(json.dumps({"bad": [record.field, record.reason]}))
    else:
      encoded.append(json.dumps({"r": record}, ensure_ascii=False))
    numbers.append(location.line)
  return np.array(encoded, dtype=object), np.array(numbers, dtype=np.int64)


# -------------------------------------------------------------------------------------------------- rendering


def decode(kind: str, location: formats.Location, raw: bytes) -> Optional[formats.Record]:
  """The record in one raw element (None for a blank JSONL line); raises `formats.BadRecord`."""
  if kind == "jsonl":
    return formats.decode_jsonl_line(location, raw)
  if kind == "tfrecord":
    record = formats.example_to_record(location, raw)
    if isinstance(record, formats.BadRecord):
      raise record
    return record
  wrapped = json.loads(raw)
  if "bad" in wrapped:
    raise formats.BadRecord(location, *wrapped["bad"])
  return wrapped["r"]


def _kept(record: formats.Record, keep: tuple[tuple[str, Any], ...]) -> bool:
  return all(_matches(record.get(field), value) for field, value in keep)


def _matches(actual: Any, expected: Any) -> bool:
  if isinstance(expected, bool):  # a TFRecord stores a bool as an int64 0/1
    return actual in (expected, int(expected))
  return actual == expected


@dataclasses.dataclass(frozen=True)
class _Renderer:
  """Renders a batch of raw elements of one kind of file of a group (the body of the pipeline's py_function)."""

  render: Render
  features: tuple[str, ...]
  kind: str
  keep: tuple[tuple[str, Any], ...]

  def __call__(self, path: tf.Tensor, raw: tf.Tensor, number: tf.Tensor) -> list[np.ndarray]:
    path = path.numpy().decode()
    with _RENDERED_LOCK:
      _STATE["rendered"] += int(raw.shape[0])
    columns = {name: [] for name in self.features}
    status, reasons = [], []
    for value, line in zip(raw.numpy(), number.numpy()):
      features, code, reason = self.one(formats.Location(path, int(line), self._unit()), value)
      for name in self.features:
        columns[name].append(features.get(name, ""))
      status.append(code)
      reasons.append(reason)
    return ([np.array(columns[name], dtype=object) for name in self.features]
            + [np.array(status, dtype=np.int32), np.array(reasons, dtype=object)])

  def one(self, location: formats.Location, raw: bytes) -> tuple[dict, int, str]:
    try:
      record = decode(self.kind, location, raw)
      if record is None or not _kept(record, self.keep):
        return {}, SKIPPED, ""
      return self.render(location, record), VALID, ""
    except formats.BadRecord as error:
      return {}, BAD, json.dumps(error.as_json(), ensure_ascii=False)

  def _unit(self) -> str:
    return "record" if self.kind == "tfrecord" else ("row" if self.kind == "parquet" else "line")


def rendered(renderer: _Renderer, path: tf.Tensor, csv_columns: tuple[str, ...], subsample_seed: Optional[int]
             ) -> tf.data.Dataset:
  """Every raw element of one file as {features..., "status", "reason", "number", "key"} (key: the subsample
  hash; number: the record's line / record / row in the file)."""
  output = (tf.string,) * len(renderer.features) + (tf.int32, tf.string)

  def render_batch(batch):
    values = tf.py_function(renderer, [path, batch["raw"], batch["number"]], output)
    for value in values:
      value.set_shape([None])
    row = {name: value for name, value in zip(renderer.features, values)}
    row.update(status=values[-2], reason=values[-1], number=batch["number"],
               key=_subsample_key(path, batch["number"], subsample_seed))
    return row

  raw = _raw_records(path, renderer.kind, csv_columns, renderer.keep).batch(RENDER_BATCH)
  return raw.map(render_batch, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def _subsample_key(path: tf.Tensor, number: tf.Tensor, seed: Optional[int]) -> tf.Tensor:
  """int64 hash of (seed, file name, record number): the random subsample keeps the smallest keys."""
  if seed is None:
    return tf.zeros_like(number)
  name = tf.strings.regex_replace(path, r"^.*/", "")
  text = tf.strings.join([str(seed), "|", name, ":", tf.strings.as_string(number)])
  return tf.strings.to_hash_bucket_fast(text, KEY_BUCKETS)


# ---------------------------------------------------------------------------------------------------- sources


class RenderedSource(seqio.DataSource):
  """Records from files under a configured root, rendered to string features; see the module docstring."""

  def __init__(self, corpus: Optional[str], splits: Sequence[str], groups: Callable[[str, str], list[Group]],
               render: Render, features: Sequence[str], cap: Optional[int | Callable[[], Optional[int]]] = None,
               csv_columns: Optional[tuple[str, ...]] = None,
               subsample_seed: Optional[Callable[[], Optional[int]]] = None):
    """
    Args:
      corpus: the `config.data_root` key of the root directory, or None when `groups` name their files directly.
      splits: split names.
      groups: (root, split) -> the groups of that split.
      render: (location, raw record) -> {feature: string}; raises `formats.BadRecord` for bad records.
      features: the names of the string features `render` returns.
      cap: at most this many valid records per group (or a function returning it, read when used).
      csv_columns: column names for header-less CSV files.
      subsample_seed: a function returning the seed of the capped random subsample (None: the first `cap`).
    """
    super().__init__(splits=splits, num_input_examples=None, caching_permitted=True)
    self.corpus, self._groups, self._render = corpus, groups, render
    self._features, self._cap, self._csv_columns = tuple(features), cap, tuple(csv_columns or ())
    self._subsample_seed = subsample_seed

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  @property
  def features(self) -> tuple[str, ...]:
    return self._features

  @property
  def csv_columns(self) -> tuple[str, ...]:
    return self._csv_columns

  def list_shards(self, split: str) -> Sequence[str]:
    return [path for group in self.groups(split) for path in group.files]

  def cap(self) -> Optional[int]:
    return self._cap() if callable(self._cap) else self._cap

  def subsample_seed(self) -> Optional[int]:
    return self._subsample_seed() if self._subsample_seed and self.cap() is not None else None

  def root(self) -> str:
    return config.data_root(self.corpus) if self.corpus else ""

  def groups(self, split: str) -> list[Group]:
    """The groups of `split` under the currently configured root; an error if there are none."""
    if split not in self.splits:
      raise ValueError(f"{self.corpus}: no split {split!r}; splits are {list(self.splits)}")
    groups = [group for group in self.discover(split).groups if group.files]
    if not groups:
      root = self.root()
      where = f"under {root} (see tasks.config.data_root for the expected layouts)" if root else "at the given paths"
      raise FileNotFoundError(f"{self.corpus or 'user dataset'}: no {split!r} files {where}")
    return groups

  def discover(self, split: str) -> Discovery:
    """What the configured root holds for `split`: the groups and every entry that is not read."""
    root = self.root()
    try:
      found = self._groups(root, split)
    except tf.errors.NotFoundError:  # the root itself does not exist
      found = []
    if isinstance(found, Discovery):
      return found
    return Discovery(root, "files", tuple(found))

  def renderer(self, group: Group, kind: str) -> _Renderer:
    return _Renderer(self._render, self._features, kind, group.keep)

  def scan(self, group: Group) -> ScanResult:
    """The group's capped counts, applying the bad-record policy once per process (cached)."""
    policy, rejects_dir = config.bad_record_policy()
    return _scan_cached(self, group, self.cap(), self.subsample_seed(), policy, rejects_dir, _STATE["scan_dir"])

  def scan_key(self, group: Group, cap: Optional[int], seed: Optional[int], policy: str) -> dict:
    """What a scan's result depends on: the task, the group, cap, seed, policy, and each file's size and mtime."""
    files = []
    for path in group.files:
      stat = tf.io.gfile.stat(path)
      files.append([path, stat.length, stat.mtime_nsec])
    return {"task": getattr(self, "task_name", None), "group": group.name, "keep": [list(k) for k in group.keep],
            "cap": cap, "subsample_seed": seed, "policy": policy, "files": files}

  def num_input_examples(self, split: str) -> int:
    return sum(self.scan(group).count for group in self.groups(split))

  def group_sizes(self, split: str) -> dict[str, int]:
    """{group name: capped number of valid records}: the mixing weights of the groups."""
    return {group.name: self.scan(group).count for group in self.groups(split)}

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None, use_cached=False,
                  num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # seqio shuffles examples and repeats after
    groups = self.groups(split)
    units = [(group, index) for group in groups for index in range(len(group.files))]
    by_file = shard_info is not None and len(units) >= shard_info.num_shards
    mine = set(units[shard_info.index::shard_info.num_shards]) if by_file else set(units)
    datasets, sizes = [], []
    for group in groups:
      scan = self.scan(group)
      indices = [index for index in range(len(group.files)) if (group, index) in mine]
      size = sum(scan.per_file[index] for index in indices)
      if not size:
        continue
      data = self._group_dataset(group, scan, indices, shuffle, seed)
      if shard_info is not None and not by_file:
        data = data.shard(shard_info.num_shards, shard_info.index)
        size = len(range(shard_info.index, size, shard_info.num_shards))
      datasets.append(data)
      sizes.append(size)
    if not datasets:
      return self._empty()
    if len(datasets) == 1:
      return datasets[0]
    weights = [size / sum(sizes) for size in sizes]
    return tf.data.Dataset.sample_from_datasets(datasets, weights=weights, seed=0 if seed is None else seed,
                                                stop_on_empty_dataset=False)

  def _group_dataset(self, group: Group, scan: ScanResult, indices: list[int], shuffle: bool,
                     seed: Optional[int]) -> tf.data.Dataset:
    """The capped valid records of the group's files `indices` (in a seeded per-epoch order with `shuffle`)."""
    by_kind: dict[str, list[int]] = {}
    for index in indices:
      by_kind.setdefault(file_kind(group.files[index]), []).append(index)
    parts = []
    for kind, kind_indices in sorted(by_kind.items()):
      files = tf.data.Dataset.from_tensor_slices(([group.files[i] for i in kind_indices],
                                                  np.array([scan.per_file[i] for i in kind_indices], np.int64)))
      if shuffle and len(kind_indices) > 1:
        files = files.shuffle(len(kind_indices), seed=seed, reshuffle_each_iteration=True)
      renderer = self.renderer(group, kind)
      parts.append(files.flat_map(functools.partial(self._file_dataset, renderer, scan.threshold)))
    data = parts[0]
    for part in parts[1:]:
      data = data.concatenate(part)
    return data

  def _file_dataset(self, renderer: _Renderer, threshold: Optional[int], path: tf.Tensor,
                    limit: tf.Tensor) -> tf.data.Dataset:
    data = rendered(renderer, path, self._csv_columns, self.subsample_seed()).filter(
        lambda row: tf.equal(row["status"], VALID))
    if threshold is not None:
      data = data.filter(lambda row: row["key"] <= threshold)
    features = self._features
    return data.take(limit).map(lambda row: {name: row[name] for name in features})

  def _empty(self) -> tf.data.Dataset:
    signature = {name: tf.TensorSpec((), tf.string) for name in self._features}
    return tf.data.Dataset.from_tensor_slices({name: tf.constant([], tf.string) for name in signature})


# ------------------------------------------------------------------------------------------------------- scans


@contextlib.contextmanager
def persisted_scans(directory: Optional[str]) -> Iterator[None]:
  """Inside: scans are kept in `directory` too, so that a restart does not read the data to count it."""
  previous, _STATE["scan_dir"] = _STATE["scan_dir"], directory
  try:
    yield
  finally:
    _STATE["scan_dir"] = previous


def records_rendered() -> int:
  """Raw records this process has rendered so far (scans and datasets): what a restart reads."""
  return _STATE["rendered"]


@functools.lru_cache(maxsize=None)
def _scan_cached(source: RenderedSource, group: Group, cap: Optional[int], subsample_seed: Optional[int],
                 policy: str, rejects_dir: Optional[str], directory: Optional[str]) -> ScanResult:
  if not directory:
    return _scan(source, group, cap, subsample_seed, policy, rejects_dir)
  key = json.dumps(source.scan_key(group, cap, subsample_seed, policy), sort_keys=True)
  path = os.path.join(directory, hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
  if tf.io.gfile.exists(path):
    stored = json.loads(tf.io.gfile.GFile(path).read())
    if stored["key"] == key:
      return ScanResult(stored["count"], tuple(stored["per_file"]), stored["threshold"],
                        tuple(formats.BadRecord.from_json(r) for r in stored["rejects"]))
  result = _scan(source, group, cap, subsample_seed, policy, rejects_dir)
  tf.io.gfile.makedirs(directory)
  temporary = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(temporary, "w") as handle:
    handle.write(json.dumps({"key": key, "count": result.count, "per_file": list(result.per_file),
                             "threshold": result.threshold, "rejects": [r.as_json() for r in result.rejects]}))
  tf.io.gfile.rename(temporary, path, overwrite=True)
  return result


def _scan(source: RenderedSource, group: Group, cap: Optional[int], subsample_seed: Optional[int], policy: str,
          rejects_dir: Optional[str]) -> ScanResult:
  """Reads the group's files once: per-file capped valid counts, the subsample threshold and the bad records."""
  counts, rejects, keys = [], [], []
  for path in group.files:
    valid = 0
    if subsample_seed is None and cap is not None and sum(counts) >= cap:
      counts.append(0)
      continue
    renderer = source.renderer(group, file_kind(path))
    corrupted = corruption(path) if renderer.kind == "tfrecord" else None
    if corrupted and policy == "raise":
      raise corrupted
    rejects += [corrupted] if corrupted else []
    batches = rendered(renderer, tf.constant(path), source.csv_columns, subsample_seed).batch(4 * RENDER_BATCH)
    for batch in batches.as_numpy_iterator():
      status, reasons, batch_keys = batch["status"], batch["reason"], batch["key"]
      for reason in reasons[status == BAD]:
        reject = formats.BadRecord.from_json(json.loads(reason))
        if policy == "raise":
          raise reject
        rejects.append(reject)
      valid += int((status == VALID).sum())
      keys.extend((int(key), len(counts)) for key in batch_keys[status == VALID])  # (key, file index)
      if subsample_seed is None and cap is not None and sum(counts) + valid >= cap:
        valid = cap - sum(counts)
        break
    counts.append(valid)
  threshold = None
  if subsample_seed is not None and cap is not None and len(keys) > cap:
    threshold = heapq.nsmallest(cap, keys)[-1][0]
    counts = [0] * len(group.files)
    for key, index in keys:
      counts[index] += key <= threshold
  if rejects:
    _write_rejects(group, rejects, rejects_dir)
  return ScanResult(sum(counts), tuple(counts), threshold, tuple(rejects))


def corruption(path: str) -> Optional[formats.BadRecord]:
  """The BadRecord of a TFRecord file's first corrupted record (where reading it stops), or None."""
  number = 0
  try:
    for number, _ in enumerate(tf.data.TFRecordDataset(path).batch(1024).as_numpy_iterator(), start=1):
      pass
  except tf.errors.DataLossError as error:
    good = sum(1 for _ in tf.data.TFRecordDataset(path).ignore_errors())
    return formats.BadRecord(formats.Location(path, good + 1, "record"), None,
                             f"corrupted TFRecord ({error.message.splitlines()[0][:120]}); the rest of the file is "
                             "unreadable")
  return None


def _write_rejects(group: Group, rejects: list[formats.BadRecord], rejects_dir: Optional[str]) -> str:
  directory = rejects_dir or os.path.join(tempfile.gettempdir(), "teacherlm_rejects")
  tf.io.gfile.makedirs(directory)
  path = os.path.join(directory, f"{group.name.replace('/', '_')}.rejects.jsonl")
  with tf.io.gfile.GFile(path, "w") as handle:
    for reject in rejects:
      handle.write(json.dumps(reject.as_json(), ensure_ascii=False) + "\n")
  logging.warning("%s: skipped %d bad records (on_bad_record='skip'); written to %s", group.name, len(rejects), path)
  return path


def clear_scan_cache() -> None:
  """Forgets scanned counts and discovered groups (after data under a root changed within one process)."""
  _scan_cached.cache_clear()
  for clear in CACHES:
    clear()
