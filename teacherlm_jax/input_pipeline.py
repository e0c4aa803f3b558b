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
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = "train"
  batch_size: int = 8
  seed: int = 0
  pack: bool = True
  loss_on_targets_only: bool = True


def converter(config: DataConfig) -> feature_converters.CausalLMFeatureConverter:
  return feature_converters.CausalLMFeatureConverter(
      pack=config.pack, loss_on_targets_only=config.loss_on_targets_only, with_example_hash=True)


def dataset(config: DataConfig, *, shuffle: bool = True, num_epochs: Optional[int] = None,
            process_index: Optional[int] = None, process_count: Optional[int] = None) -> tf.data.Dataset:
  """This process's batches: dicts of int32 [batch_size / process_count, length] (+ `example_hash`)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if config.batch_size % count:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the {count} processes")
  lengths = dict(config.task_feature_lengths)
  lengths[EXAMPLE_HASH] = sum(lengths.values())  # room for one hash per packed example
  tasks.get_mixture_or_task(config.mixture_or_task_name)  # registers gin-configured datasets; clear errors
  data = seqio.get_dataset(
      config.mixture_or_task_name, task_feature_lengths=lengths, dataset_split=config.split, shuffle=shuffle,
      num_epochs=num_epochs, seed=config.seed, shard_info=seqio.ShardInfo(index=index, num_shards=count),
      feature_converter=converter(config), use_cached=False)
  return data.batch(config.batch_size // count, drop_remainder=True)


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
