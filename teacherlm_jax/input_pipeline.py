"""The training input pipeline: a seqio mixture as per-process numpy batches, resumable at an exact position.

The data is read in `num_data_shards` disjoint shards (default: one per process); shard s fills rows
[s * B/S, (s+1) * B/S) of every global batch and each process reads only the shards of its rows
(`seqio.ShardInfo`; the sources open only their share of the files). Every shard is its own tf.data pipeline,
deterministic for a seed (seeded file order per epoch, seeded shuffle buffer, seeded mixing).

Resume without replay: `BatchIterator.save(directory)` writes each of this process's shard iterators with
`tf.train.Checkpoint` (T5X's `checkpoint_input_pipeline`: the readers' file offsets, the shuffle buffers, the
packing state) to `directory/shard-SSSSS-of-NNNNN`, and `BatchIterator(..., restore_from=directory)` continues
from there, at a cost that does not grow with the position. Without a saved state (or with another shard count) a
restart can still skip `batches_consumed` batches (replay), which the trainer logs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Mapping, Optional

import jax
import numpy as np
import seqio
import tensorflow as tf

import tasks
from tasks import config as task_config
from teacherlm_jax import data_sources, feature_converters, vocabularies

EXAMPLE_HASH = feature_converters.EXAMPLE_HASH


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read.

  Attributes:
    mixture_or_task_name: a registered seqio task or mixture.
    task_feature_lengths: e.g. {"inputs": 1024, "targets": 1024}; the model length is their sum.
    split: the split to read.
    batch_size: the global batch size (all processes together).
    seed: shuffle seed (fixed by default, so runs are reproducible).
    pack: pack several examples per row.
    loss_on_targets_only: put the loss on targets only (False: on the whole sequence, as the official release).
    keep_last_tokens: an example longer than inputs + targets length keeps its last tokens (the official release
      keeps the last 2,048) instead of its first.
    shuffle_buffer_size: examples in each task's shuffle buffer (None: the task's own, 10,000).
    use_cached: read the tasks' prepared caches (`python -m teacherlm_jax.prepare`) from `tasks.config.cache_dirs`:
      no scan at start, mixing rates from the caches' stats, file-level host sharding over the cache shards.
    num_data_shards: how many disjoint shards the data is read in (None: one per process, as T5X). Shard s fills
      rows [s * B/S, (s+1) * B/S) of every global batch, and each process reads only the shards of its rows, so
      with a fixed number the global batches, and the training, do not depend on the number of processes.
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = "train"
  batch_size: int = 8
  seed: int = 0
  pack: bool = True
  loss_on_targets_only: bool = True
  num_data_shards: Optional[int] = None
  keep_last_tokens: bool = False
  shuffle_buffer_size: Optional[int] = None
  use_cached: bool = False


def converter(config: DataConfig) -> feature_converters.CausalLMFeatureConverter:
  """The feature converter of the run; examples start with BOS where the tasks' vocabulary prepends one."""
  vocabulary = seqio.get_mixture_or_task(config.mixture_or_task_name).output_features["targets"].vocabulary
  bos = vocabularies.bos_to_prepend(vocabulary)
  return feature_converters.CausalLMFeatureConverter(
      pack=config.pack, loss_on_targets_only=config.loss_on_targets_only, with_example_hash=True,
      keep_last_tokens=config.keep_last_tokens, bos_id=0 if bos is None else bos)


def shard_range(config: DataConfig, process_index: int, process_count: int) -> tuple[range, int]:
  """(the data shards this process reads, the number of shards)."""
  shards = config.num_data_shards or process_count
  if shards % process_count or config.batch_size % shards:
    raise ValueError(f"num_data_shards={shards} must be a multiple of the {process_count} processes and divide "
                     f"batch_size={config.batch_size}")
  return range(process_index * shards // process_count, (process_index + 1) * shards // process_count), shards


def shard_dataset(config: DataConfig, shard: int, num_shards: int, *, shuffle: bool = True,
                  num_epochs: Optional[int] = None) -> tf.data.Dataset:
  """One data shard's rows of every global batch: dicts of int32 [batch_size / num_shards, length]."""
  lengths = dict(config.task_feature_lengths)
  lengths[EXAMPLE_HASH] = sum(lengths.values())  # room for one hash per packed example
  mixed = mix(config, lengths, shuffle=shuffle, num_epochs=num_epochs,
              shard_info=seqio.ShardInfo(index=shard, num_shards=num_shards))
  batches = converter(config)(mixed, lengths).batch(config.batch_size // num_shards, drop_remainder=True)
  options = tf.data.Options()
  # The Python steps (rendering, tokenizing) are pure functions of their inputs: the iterator state is the
  # readers', buffers' and seeds' state, which tf.data saves; the functions have none to save.
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  return batches.with_options(options)


def mix(config: DataConfig, lengths: Mapping[str, int], *, shuffle: bool, num_epochs: Optional[int],
        shard_info: seqio.ShardInfo) -> tf.data.Dataset:
  """The tasks of a mixture (or one task), each shuffled within its epochs, sampled by the mixture's rates.

  seqio's own mixtures repeat before shuffling (mixing epochs) and stop at the first exhausted task; here each task
  sees each of its examples once per epoch, and a finite run (num_epochs=1) yields every example exactly once.
  """
  if config.use_cached:
    seqio.add_global_cache_dirs(list(task_config.cache_dirs()))
  provider = tasks.get_mixture_or_task(config.mixture_or_task_name)
  members = ([(task, provider.get_rate(task)) for task in provider.tasks] if isinstance(provider, seqio.Mixture)
             else [(provider, 1.0)])
  features = ("inputs", "targets", EXAMPLE_HASH)
  if config.use_cached:
    for task, _ in members:
      data_sources.check_cache(task)
  datasets = []
  for task, _ in members:
    data = task.get_dataset(sequence_length=lengths, split=config.split, shuffle=shuffle, seed=config.seed,
                            use_cached=config.use_cached,
                            shard_info=shard_info, num_epochs=1, trim_output_features=not config.keep_last_tokens,
                            shuffle_buffer_size=config.shuffle_buffer_size, try_in_mem_cache=False)
    data = data.map(lambda example: {name: example[name] for name in features if name in example})
    datasets.append(data.repeat(num_epochs) if num_epochs != 1 else data)
  if len(datasets) == 1:
    return datasets[0]
  total = sum(rate for _, rate in members)
  return tf.data.Dataset.sample_from_datasets(datasets, weights=[rate / total for _, rate in members],
                                              seed=config.seed, stop_on_empty_dataset=False)


class BatchIterator:
  """Numpy batches of a `DataConfig` for this process, resumable from a saved iterator state (or by skipping)."""

  def __init__(self, config: DataConfig, batches_consumed: int = 0, *, restore_from: Optional[str] = None,
               shuffle: bool = True, num_epochs: Optional[int] = None, process_index: Optional[int] = None,
               process_count: Optional[int] = None):
    """
    Args:
      config: what to read.
      batches_consumed: the position; without `restore_from`, that many batches are skipped (replayed).
      restore_from: a directory written by `save` at that position: the iterators continue from there.
      shuffle, num_epochs: as `shard_dataset`.
      process_index, process_count: this process (default: jax's).
    """
    self.config, self.batches_consumed = config, batches_consumed
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    self.shards, self.num_shards = shard_range(config, index, count)
    self.batches_skipped = 0
    datasets = [shard_dataset(config, shard, self.num_shards, shuffle=shuffle, num_epochs=num_epochs)
                for shard in self.shards]
    if not restore_from and batches_consumed:
      datasets = [data.skip(batches_consumed) for data in datasets]
      self.batches_skipped = batches_consumed
    self._iterators = [iter(data.prefetch(2)) for data in datasets]
    if restore_from:
      self._restore(restore_from)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [{name: value.numpy() for name, value in next(iterator).items()} for iterator in self._iterators]
    self.batches_consumed += 1
    if len(parts) == 1:
      return parts[0]
    return {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}

  def state(self) -> dict:
    """What a checkpoint stores to resume the data exactly."""
    return {"mixture_or_task_name": self.config.mixture_or_task_name, "seed": self.config.seed,
            "batches_consumed": self.batches_consumed, "num_data_shards": self.num_shards}

  def save(self, directory: str) -> list[str]:
    """Writes this process's shard iterators to `directory` (synchronously); returns the checkpoint prefixes."""
    tf.io.gfile.makedirs(directory)
    prefixes = []
    for shard, iterator in zip(self.shards, self._iterators):
      prefixes.append(tf.train.Checkpoint(iterator=iterator).write(shard_prefix(directory, shard, self.num_shards)))
    return prefixes

  def _restore(self, directory: str) -> None:
    for shard, iterator in zip(self.shards, self._iterators):
      prefix = shard_prefix(directory, shard, self.num_shards)
      if not tf.io.gfile.exists(prefix + ".index"):
        raise FileNotFoundError(f"{prefix}: no saved input state for data shard {shard} of {self.num_shards}")
      tf.train.Checkpoint(iterator=iterator).read(prefix).assert_consumed()


def shard_prefix(directory: str, shard: int, num_shards: int) -> str:
  """The checkpoint prefix of one data shard's iterator state."""
  return os.path.join(directory, f"shard-{shard:05d}-of-{num_shards:05d}")


def has_saved_state(directory: str, shards: range, num_shards: int) -> bool:
  """Whether `directory` holds the iterator states of these data shards (of `num_shards`)."""
  return all(tf.io.gfile.exists(shard_prefix(directory, shard, num_shards) + ".index") for shard in shards)


def example_hashes(batch: Mapping[str, np.ndarray]) -> list[int]:
  """The hashes of the examples in a (packed) batch, in order, without padding."""
  return [int(h) for h in np.asarray(batch[EXAMPLE_HASH]).ravel() if h != 0]


def model_features(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The features the model consumes (drops the bookkeeping `example_hash`)."""
  return {name: value for name, value in batch.items() if name != EXAMPLE_HASH}
