"""The training input pipeline: a seqio mixture as per-process numpy batches, resumable at an exact position.

Each process reads its own shard (`seqio.ShardInfo(process_index, process_count)`) and yields its rows of the global
batch. The pipeline is deterministic for a seed (seeded shuffle, fixed record order, repeat), so the position in the
data is just the number of batches consumed: a restart rebuilds the pipeline and skips that many batches, and sees
exactly the batches an uninterrupted run would have seen next.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Optional

import jax
import numpy as np
import seqio
import tensorflow as tf

import tasks
from teacherlm_jax import feature_converters

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


def converter(config: DataConfig) -> feature_converters.CausalLMFeatureConverter:
  return feature_converters.CausalLMFeatureConverter(
      pack=config.pack, loss_on_targets_only=config.loss_on_targets_only, with_example_hash=True,
      keep_last_tokens=config.keep_last_tokens)


def dataset(config: DataConfig, *, shuffle: bool = True, num_epochs: Optional[int] = None,
            process_index: Optional[int] = None, process_count: Optional[int] = None) -> tf.data.Dataset:
  """This process's rows of every global batch: dicts of int32 [batch_size / process_count, length]."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  shards = config.num_data_shards or count
  if shards % count or config.batch_size % shards:
    raise ValueError(f"num_data_shards={shards} must be a multiple of the {count} processes and divide "
                     f"batch_size={config.batch_size}")
  lengths = dict(config.task_feature_lengths)
  lengths[EXAMPLE_HASH] = sum(lengths.values())  # room for one hash per packed example
  per_shard = []
  for shard in range(index * shards // count, (index + 1) * shards // count):
    mixed = mix(config, lengths, shuffle=shuffle, num_epochs=num_epochs,
                shard_info=seqio.ShardInfo(index=shard, num_shards=shards))
    per_shard.append(converter(config)(mixed, lengths).batch(config.batch_size // shards, drop_remainder=True))
  if len(per_shard) == 1:
    return per_shard[0]
  return tf.data.Dataset.zip(tuple(per_shard)).map(
      lambda *parts: {name: tf.concat([part[name] for part in parts], axis=0) for name in parts[0]})


def mix(config: DataConfig, lengths: Mapping[str, int], *, shuffle: bool, num_epochs: Optional[int],
        shard_info: seqio.ShardInfo) -> tf.data.Dataset:
  """The tasks of a mixture (or one task), each shuffled within its epochs, sampled by the mixture's rates.

  seqio's own mixtures repeat before shuffling (mixing epochs) and stop at the first exhausted task; here each task
  sees each of its examples once per epoch, and a finite run (num_epochs=1) yields every example exactly once.
  """
  provider = tasks.get_mixture_or_task(config.mixture_or_task_name)
  members = ([(task, provider.get_rate(task)) for task in provider.tasks] if isinstance(provider, seqio.Mixture)
             else [(provider, 1.0)])
  features = ("inputs", "targets", EXAMPLE_HASH)
  datasets = []
  for task, _ in members:
    data = task.get_dataset(sequence_length=lengths, split=config.split, shuffle=shuffle, seed=config.seed,
                            shard_info=shard_info, num_epochs=1, trim_output_features=not config.keep_last_tokens)
    data = data.map(lambda example: {name: example[name] for name in features if name in example})
    datasets.append(data.repeat(num_epochs) if num_epochs != 1 else data)
  if len(datasets) == 1:
    return datasets[0]
  total = sum(rate for _, rate in members)
  return tf.data.Dataset.sample_from_datasets(datasets, weights=[rate / total for _, rate in members],
                                              seed=config.seed, stop_on_empty_dataset=False)


class BatchIterator:
  """Numpy batches of a `DataConfig`, counting what it hands out so that a restart can skip exactly that far."""

  def __init__(self, config: DataConfig, batches_consumed: int = 0, **dataset_kwargs):
    self.config, self.batches_consumed = config, batches_consumed
    data = dataset(config, **dataset_kwargs).skip(batches_consumed).prefetch(2)
    self._iterator = data.as_numpy_iterator()

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self.batches_consumed += 1
    return batch

  def state(self) -> dict:
    """What a checkpoint stores to resume the data exactly."""
    return {"mixture_or_task_name": self.config.mixture_or_task_name, "seed": self.config.seed,
            "batches_consumed": self.batches_consumed}


def example_hashes(batch: Mapping[str, np.ndarray]) -> list[int]:
  """The hashes of the examples in a (packed) batch, in order, without padding."""
  return [int(h) for h in np.asarray(batch[EXAMPLE_HASH]).ravel() if h != 0]


def model_features(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The features the model consumes (drops the bookkeeping `example_hash`)."""
  return {name: value for name, value in batch.items() if name != EXAMPLE_HASH}
