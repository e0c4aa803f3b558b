"""Prepare the training tasks once, on Apache Beam: seqio offline caches that training reads with `use_cached=True`.

  python -m teacherlm_jax.prepare --tasks=teacherlm_stage1_multitask --output_cache_dir=/data/cache \\
      --gin_file=gin/models/bloom_7b1.gin --gin.TOKENIZER_PATH="'/ckpt/tokenizer.json'" \\
      --gin.data_root.p3_sense_3k="'/data/P3'" --gin.data_root.muffin_3w="'/data/flan2021'" \\
      --runner=DirectRunner --direct_num_workers=8 --direct_running_mode=multi_processing
  (on a cluster: --runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp --setup_file=./setup.py,
   or --runner=FlinkRunner / SparkRunner with their options; every flag that is not ours goes to Beam)

Each task (a mixture names its tasks) and split is one Beam pipeline over the same readers and renderers as the
uncached path (`tasks.sources`): every (group, file) is read and rendered on a worker, a group's cap keeps its first
N records in file order or its seeded random subsample (`beam.combiners.Top.SmallestPerKey`: the records the
uncached path keeps, and no scan), the records go through the task's preprocessors up to its
`seqio.CacheDatasetPlaceholder` (the example hash and tokenization; the vocabulary is part of the cache), and are
written to `num_shards` shards by a hash of their content, each shard sorted by that hash (so a task-sorted corpus
is mixed within every shard, and the cache is the same on every run and runner). The cache directory is seqio's:

  <output_cache_dir>/<task>/<split>.tfrecord-SSSSS-of-NNNNN   tf.train.Examples (seqio.dict_to_tfexample)
  <output_cache_dir>/<task>/info.<split>.json                  features, dtypes, shapes, num_shards (seqio)
  <output_cache_dir>/<task>/stats.<split>.json                 examples, <feature>_tokens, <feature>_max_tokens
  <output_cache_dir>/<task>/groups.<split>.json                capped examples per group
  <output_cache_dir>/<task>/rejects.<split>.jsonl              bad records skipped (on_bad_record='skip')
  <output_cache_dir>/<task>/teacherlm.json                     what the cache was made from (`data_sources.fingerprint`)
  <output_cache_dir>/<task>/COMPLETED                          written last: seqio reads only complete caches

Training: `--gin.USE_CACHED=True --gin.CACHE_DIRS="['/data/cache']"` (train.gin): the mixing rates come from the
stats, each host opens only its share of the shard files, and a cache made from another configuration (roots,
caps, subsample, selection, vocabulary) is refused (`data_sources.check_cache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
import seqio
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions
from etils import epath

import tasks
from tasks import config as task_config
from tasks import sources
from teacherlm_jax import data_sources, gin_utils

log = logging.getLogger("teacherlm_jax")
FINGERPRINT_FILE = data_sources.FINGERPRINT_FILE


# ---------------------------------------------------------------------------------------------- Beam stages


class _Worker(beam.DoFn):
  """A DoFn that sets up the driver's gin configuration and task registry in its worker first."""

  def __init__(self, gin_config: str, task_name: str):
    self._gin_config, self._task_name = gin_config, task_name

  def setup(self):
    import gin
    gin.clear_config()
    gin.parse_config(self._gin_config)
    self.task = tasks.get_mixture_or_task(self._task_name)


class _ReadFile(_Worker):
  """(group, file) -> (group index, (order key, features)) for its valid kept records; bad ones to 'rejects'."""

  def process(self, unit) -> Iterable[Any]:
    group_index, file_index, group, path = unit
    source = self.task.source
    policy, _ = task_config.bad_record_policy()
    seed = source.subsample_seed()
    renderer = source.renderer(group, sources.file_kind(path))
    corrupted = sources.corruption(path) if renderer.kind == "tfrecord" else None
    if corrupted and policy == "raise":
      raise corrupted
    if corrupted:
      yield beam.pvalue.TaggedOutput("rejects", corrupted.as_json())
    data = sources.rendered(renderer, tf.constant(path), source.csv_columns, seed)
    for batch in data.batch(4 * sources.RENDER_BATCH).as_numpy_iterator():
      for row in range(len(batch["status"])):
        status = int(batch["status"][row])
        if status == sources.BAD:
          reject = json.loads(batch["reason"][row])
          if policy == "raise":
            raise sources.formats.BadRecord.from_json(reject)
          yield beam.pvalue.TaggedOutput("rejects", reject)
        elif status == sources.VALID:
          key = int(batch["key"][row]) if seed is not None else (file_index, int(batch["number"][row]))
          features = {name: batch[name][row].decode("utf-8") for name in source.features}
          yield group_index, (key, features)


class _Preprocess(_Worker):
  """Batches of rendered features -> the task's examples up to its CacheDatasetPlaceholder, as numpy dicts."""

  def process(self, batch: list[dict[str, str]]) -> Iterable[dict[str, np.ndarray]]:
    names = self.task.source.features
    data = tf.data.Dataset.from_tensor_slices({name: [features[name] for features in batch] for name in names})
    for example in self.task.preprocess_precache(data).as_numpy_iterator():
      yield example


class _CountTokens(_Worker):
  """(stat, value) pairs of one example: `examples` 1 and, per token feature, its non-EOS, non-padding tokens."""

  def process(self, example: dict[str, np.ndarray]) -> Iterable[tuple[str, int]]:
    yield "examples", 1
    for name, feature in self.task.output_features.items():
      values = example.get(name)
      if values is None or not np.issubdtype(np.asarray(values).dtype, np.integer) or name not in ("inputs", "targets"):
        continue
      vocabulary = feature.vocabulary
      valid = np.ones_like(values, dtype=bool)
      for special in (vocabulary.eos_id, vocabulary.pad_id):
        if special is not None:
          valid &= values != special
      yield f"{name}_tokens", int(valid.sum())


def _serialized(example: dict[str, np.ndarray], num_shards: int) -> tuple[int, tuple[bytes, bytes]]:
  """(shard, (content hash, tf.train.Example bytes)): shards and the order within them come from the content."""
  record = seqio.dict_to_tfexample(example).SerializeToString(deterministic=True)
  digest = hashlib.sha256(record).digest()
  return int.from_bytes(digest[:8], "little") % num_shards, (digest, record)


class _WriteShard(beam.DoFn):
  """Writes one shard's records, sorted by content hash, through a temporary name."""

  def __init__(self, prefix: str, num_shards: int):
    self._prefix, self._num_shards = prefix, num_shards

  def process(self, item) -> Iterable[int]:
    shard, records = item
    path = shard_path(self._prefix, shard, self._num_shards)
    temporary = f"{path}.tmp"
    with tf.io.TFRecordWriter(temporary) as writer:
      for _, record in sorted(records):
        writer.write(record)
    tf.io.gfile.rename(temporary, path, overwrite=True)
    yield shard


def shard_path(prefix: str, shard: int, num_shards: int) -> str:
  return f"{prefix}-{shard:05d}-of-{num_shards:05d}"


def _info(example: dict[str, np.ndarray], num_shards: int) -> dict[str, Any]:
  """seqio's info.<split>.json: feature dtypes and shapes (first dimension variable), the shard count."""
  features = {}
  for name, value in example.items():
    tensor = tf.constant(value)
    shape = tensor.shape.as_list()
    features[name] = {"shape": [None] + shape[1:] if shape else [], "dtype": tensor.dtype.name}
  return {"num_shards": num_shards, "features": features, "seqio_version": seqio.__version__}


# ----------------------------------------------------------------------------------------------- pipelines


def build(pipeline: beam.Pipeline, task: seqio.Task, split: str, cache_dir: str, num_shards: int,
          gin_config: str) -> None:
  """Adds the stages that write `task`'s `split` to `cache_dir` (see the module docstring)."""
  source = task.source
  groups = source.groups(split)
  units = [(g, f, group, path) for g, group in enumerate(groups) for f, path in enumerate(group.files)]
  name = f"{task.name}/{split}"
  read = (pipeline | f"{name}/units" >> beam.Create(units) | f"{name}/reshuffle_units" >> beam.Reshuffle()
          | f"{name}/read" >> beam.ParDo(_ReadFile(gin_config, task.name)).with_outputs("rejects", main="records"))
  records = read.records
  cap = source.cap()
  if cap is not None:
    records = (records | f"{name}/cap" >> beam.combiners.Top.SmallestPerKey(cap, key=lambda value: value[0])
               | f"{name}/capped" >> beam.FlatMap(lambda item: [(item[0], value) for value in item[1]]))
  prefix = os.path.join(cache_dir, f"{split}.tfrecord")
  examples = (records | f"{name}/features" >> beam.Map(lambda item: item[1][1])
              | f"{name}/batch" >> beam.BatchElements(min_batch_size=64, max_batch_size=1024)
              | f"{name}/preprocess" >> beam.ParDo(_Preprocess(gin_config, task.name)))
  _ = (examples | f"{name}/serialize" >> beam.Map(_serialized, num_shards)
       | f"{name}/by_shard" >> beam.GroupByKey() | f"{name}/write" >> beam.ParDo(_WriteShard(prefix, num_shards)))
  counts = examples | f"{name}/count" >> beam.ParDo(_CountTokens(gin_config, task.name))
  totals = counts | f"{name}/sum" >> beam.CombinePerKey(sum)
  maxima = (counts | f"{name}/token_counts" >> beam.Filter(lambda pair: pair[0] != "examples")
            | f"{name}/max" >> beam.CombinePerKey(max)
            | f"{name}/max_names" >> beam.Map(lambda pair: (pair[0].replace("_tokens", "_max_tokens"), pair[1])))
  _write_json((totals, maxima) | f"{name}/stats_pairs" >> beam.Flatten()
              | f"{name}/stats_list" >> beam.combiners.ToList() | f"{name}/stats" >> beam.Map(dict),
              name + "/write_stats", seqio.utils.get_cached_stats_path(cache_dir, split))
  _write_json(examples | f"{name}/sample" >> beam.combiners.Sample.FixedSizeGlobally(1)
              | f"{name}/info" >> beam.Map(lambda sample: _info(sample[0], num_shards) if sample else {}),
              name + "/write_info", seqio.utils.get_cached_info_path(cache_dir, split))
  group_names = [group.name for group in groups]
  _write_json(records | f"{name}/group_keys" >> beam.Map(lambda item: item[0])
              | f"{name}/group_counts" >> beam.combiners.Count.PerElement()
              | f"{name}/group_list" >> beam.combiners.ToList()
              | f"{name}/groups" >> beam.Map(lambda pairs: {group_names[g]: n for g, n in sorted(pairs)}),
              name + "/write_groups", os.path.join(cache_dir, f"groups.{split}.json"))
  _ = (read.rejects | f"{name}/rejects_list" >> beam.combiners.ToList()
       | f"{name}/write_rejects" >> beam.Map(_write_rejects, os.path.join(cache_dir, f"rejects.{split}.jsonl")))


def _write_json(values, label: str, path: str) -> None:
  _ = values | label >> beam.Map(lambda value: epath.Path(path).write_text(json.dumps(value, indent=2,
                                                                                     sort_keys=True)))


def _write_rejects(rejects: list[dict], path: str) -> int:
  rows = sorted(rejects, key=lambda r: (r["file"], r.get("line", r.get("record", r.get("row", 0)))))
  epath.Path(path).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
  return len(rows)


def task_names(names: Sequence[str]) -> list[str]:
  """The tasks of the given tasks and mixtures, each once, in order."""
  found: list[str] = []
  for name in names:
    provider = tasks.get_mixture_or_task(name)
    members = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    found += [task.name for task in members if task.name not in found]
  return found


def prepare(names: Sequence[str], output_cache_dir: str, splits: Sequence[str] = ("train",), num_shards: int = 64,
            beam_options: Sequence[str] = (), overwrite: bool = False) -> list[str]:
  """Writes the caches of every task of `names` (tasks or mixtures); returns the cache directories written."""
  import gin
  gin_config = gin.config_str()
  written = []
  for name in task_names(names):
    task = seqio.TaskRegistry.get(name)
    cache_dir = os.path.join(output_cache_dir, seqio.utils.get_task_dir_from_name(name))
    if tf.io.gfile.exists(os.path.join(cache_dir, "COMPLETED")) and not overwrite:
      log.info("%s: already cached at %s (pass --overwrite to prepare it again)", name, cache_dir)
      continue
    if not task.supports_caching:
      raise ValueError(f"{name} has no seqio.CacheDatasetPlaceholder, so it cannot be cached")
    tf.io.gfile.makedirs(cache_dir)
    task_splits = [split for split in splits if split in task.source.splits]
    with beam.Pipeline(options=PipelineOptions(list(beam_options) or ["--runner=DirectRunner"])) as pipeline:
      for split in task_splits:
        build(pipeline, task, split, cache_dir, num_shards, gin_config)
    _finish(task, cache_dir, task_splits, num_shards)
    written.append(cache_dir)
  return written


def _finish(task: seqio.Task, cache_dir: str, splits: Sequence[str], num_shards: int) -> None:
  """Empty files for shards no record fell into, the fingerprint, then COMPLETED."""
  directory = epath.Path(cache_dir)
  for split in splits:
    prefix = os.path.join(cache_dir, f"{split}.tfrecord")
    for shard in range(num_shards):
      if not tf.io.gfile.exists(shard_path(prefix, shard, num_shards)):
        tf.io.TFRecordWriter(shard_path(prefix, shard, num_shards)).close()
    stats = json.loads((directory / f"stats.{split}.json").read_text())
    log.info("%s [%s]: %d examples in %d shards at %s", task.name, split, stats.get("examples", 0), num_shards,
             cache_dir)
  (directory / FINGERPRINT_FILE).write_text(json.dumps({**data_sources.fingerprint(task), "splits": list(splits)}, indent=2))
  (directory / "COMPLETED").write_text("")


def main(argv: Optional[Sequence[str]] = None) -> int:
  import argparse
  from teacherlm_jax import shell
  gin_files, bindings, rest = gin_utils.split_gin_args(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(prog="python -m teacherlm_jax.prepare", description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", required=True, help="comma-separated tasks and mixtures")
  parser.add_argument("--output_cache_dir", required=True)
  parser.add_argument("--splits", default="train,validation")
  parser.add_argument("--num_shards", type=int, default=64, help="shard files per split (>= the reading hosts)")
  parser.add_argument("--overwrite", action="store_true", help="prepare tasks that are already cached again")
  args, beam_options = parser.parse_known_args(rest)
  shell.setup_logging()
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  gin_utils.parse_gin(gin_files, bindings)
  prepare(args.tasks.split(","), args.output_cache_dir, args.splits.split(","), args.num_shards, beam_options,
          args.overwrite)
  return 0


if __name__ == "__main__":
  from teacherlm_jax import prepare as prepare_module
  sys.exit(prepare_module.main())
