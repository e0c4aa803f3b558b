"""seqio data sources that read records from a gin-configured root, validate them and render them in Python.

A `RenderedSource` has, per split, one or more *groups* (a P3 prompt, a Muffin task, or the one file set of a
corpus). Each group's records are read in file order, validated and rendered into string features by a Python
function (the prompt formats live in `tasks.rendering`), optionally capped to its first `cap` valid records, and the
groups are interleaved by `tf.data.Dataset.sample_from_datasets` with weights proportional to their capped sizes:
every capped record appears exactly once per epoch, and the groups' mixing rates follow the capped counts.

Host sharding (`seqio.ShardInfo`) takes every `num_shards`-th record of each group, so the shards are disjoint and
together cover the data. Bad records follow `config.bad_record_policy()`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
from typing import Any, Callable, Iterator, Optional, Sequence

import seqio
import tensorflow as tf

from tasks import config, formats

Render = Callable[[formats.Location, formats.Record], dict[str, str]]
Reader = Callable[[str], Iterator[formats.Item]]


@dataclasses.dataclass(frozen=True)
class Group:
  """One capped unit of a source: a name and its files (read in order)."""

  name: str
  files: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ScanResult:
  """Valid-record count of a group (up to its cap) and the bad records met on the way."""

  count: int
  rejects: tuple[formats.BadRecord, ...]


def list_files(pattern: str) -> list[str]:
  """Sorted files matching a glob (local or gs://)."""
  return sorted(tf.io.gfile.glob(pattern))


def reader_for(path: str, csv_columns: Optional[tuple[str, ...]] = None) -> Iterator[formats.Item]:
  """Picks the reader from the file name: .jsonl, .csv, or TFRecord (`.tfrecord*`)."""
  name = os.path.basename(path)
  if name.endswith(".jsonl"):
    return formats.iter_jsonl(path)
  if name.endswith(".csv"):
    return formats.iter_csv(path, csv_columns or ())
  if ".tfrecord" in name:
    return formats.iter_tfrecord(path)
  raise ValueError(f"{path}: unknown format (expected .jsonl, .csv or .tfrecord*)")


def _rendered(group: Group, render: Render, csv_columns) -> Iterator[tuple[formats.Location, Any]]:
  """(location, features or BadRecord) for every record of the group, in order."""
  for path in group.files:
    for location, record in reader_for(path, csv_columns):
      if isinstance(record, formats.BadRecord):
        yield location, record
        continue
      try:
        yield location, render(location, record)
      except formats.BadRecord as error:
        yield location, error


class RenderedSource(seqio.DataSource):
  """Records from files under a configured root, rendered to string features; see the module docstring."""

  def __init__(self, corpus: Optional[str], splits: Sequence[str], groups: Callable[[str, str], list[Group]],
               render: Render, features: Sequence[str], cap: Optional[int | Callable[[], Optional[int]]] = None,
               csv_columns: Optional[tuple[str, ...]] = None):
    """
    Args:
      corpus: the `config.data_root` key of the root directory, or None when `groups` name their files directly.
      splits: split names.
      groups: (root, split) -> the groups of that split.
      render: (location, raw record) -> {feature: string}; raises `formats.BadRecord` for bad records.
      features: the names of the string features `render` returns.
      cap: at most this many valid records per group (or a function returning it, read when used).
      csv_columns: column names for header-less CSV files.
    """
    super().__init__(splits=splits, num_input_examples=None, caching_permitted=False)
    self.corpus, self._groups, self._render = corpus, groups, render
    self._features, self._cap, self._csv_columns = tuple(features), cap, csv_columns

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [path for group in self.groups(split) for path in group.files]

  def cap(self) -> Optional[int]:
    return self._cap() if callable(self._cap) else self._cap

  def groups(self, split: str) -> list[Group]:
    """The groups of `split` under the currently configured root; an error if there are none."""
    if split not in self.splits:
      raise ValueError(f"{self.corpus}: no split {split!r}; splits are {list(self.splits)}")
    root = config.data_root(self.corpus) if self.corpus else ""
    try:
      groups = [group for group in self._groups(root, split) if group.files]
    except tf.errors.NotFoundError:  # the root itself does not exist
      groups = []
    if not groups:
      where = f"under {root} (see tasks.config.data_root for the expected layout)" if root else "at the given paths"
      raise FileNotFoundError(f"{self.corpus or 'user dataset'}: no {split!r} files {where}")
    return groups

  def scan(self, group: Group) -> ScanResult:
    """Counts the group's valid records (up to the cap), applying the bad-record policy once per process."""
    return _scan(group, self._render, self.cap(), self._csv_columns)

  def num_input_examples(self, split: str) -> int:
    return sum(self.scan(group).count for group in self.groups(split))

  def group_sizes(self, split: str) -> dict[str, int]:
    """{group name: capped number of valid records}: the mixing weights of the groups."""
    return {group.name: self.scan(group).count for group in self.groups(split)}

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None, use_cached=False,
                  num_epochs=1) -> tf.data.Dataset:
    del shuffle, sequence_length, use_cached, num_epochs  # record order is fixed; seqio shuffles after
    groups = self.groups(split)
    sizes = [self.scan(group).count for group in groups]
    datasets = [self._group_dataset(group, size, shard_info) for group, size in zip(groups, sizes)]
    if len(datasets) == 1:
      return datasets[0]
    weights = [size / max(sum(sizes), 1) for size in sizes]
    return tf.data.Dataset.sample_from_datasets(datasets, weights=weights, seed=0 if seed is None else seed,
                                                stop_on_empty_dataset=False)

  def _group_dataset(self, group: Group, size: int, shard_info: Optional[seqio.ShardInfo]) -> tf.data.Dataset:
    signature = {name: tf.TensorSpec((), tf.string) for name in self._features}
    generator = functools.partial(_valid_features, group, self._render, size, self._csv_columns)
    dataset = tf.data.Dataset.from_generator(generator, output_signature=signature)
    if shard_info is not None:
      dataset = dataset.shard(shard_info.num_shards, shard_info.index)
    return dataset


def _valid_features(group: Group, render: Render, limit: int, csv_columns) -> Iterator[dict[str, str]]:
  """The first `limit` valid rendered records (bad ones were reported by the scan)."""
  produced = 0
  for _, features in _rendered(group, render, csv_columns):
    if produced >= limit:
      return
    if not isinstance(features, formats.BadRecord):
      produced += 1
      yield features


@functools.lru_cache(maxsize=None)
def _scan_cached(group: Group, render: Render, cap: Optional[int], csv_columns, policy: str,
                 rejects_dir: Optional[str]) -> ScanResult:
  count, rejects = 0, []
  for _, features in _rendered(group, render, csv_columns):
    if cap is not None and count >= cap:
      break
    if isinstance(features, formats.BadRecord):
      if policy == "raise":
        raise features
      rejects.append(features)
    else:
      count += 1
  if rejects:
    _write_rejects(group, rejects, rejects_dir)
  return ScanResult(count, tuple(rejects))


def _scan(group: Group, render: Render, cap: Optional[int], csv_columns) -> ScanResult:
  policy, rejects_dir = config.bad_record_policy()
  return _scan_cached(group, render, cap, csv_columns, policy, rejects_dir)


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
  """Forgets scanned counts (after data under a root changed within one process)."""
  _scan_cached.cache_clear()
