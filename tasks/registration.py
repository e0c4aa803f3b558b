"""Shared pieces of task registration: the gin-chosen vocabulary, output features and the seqio preprocessors."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import gin
import seqio
import tensorflow as tf

from tasks import config, sources


class ConfiguredVocabulary(seqio.Vocabulary):
  """A vocabulary that resolves to `config.task_vocabulary()` when used, so gin can choose it after `import tasks`.

  Every method delegates; two ConfiguredVocabulary objects are equal (they resolve to the same vocabulary).
  """

  def __init__(self):
    super().__init__(extra_ids=0)

  @property
  def resolved(self) -> seqio.Vocabulary:
    return config.task_vocabulary()

  @property
  def eos_id(self) -> Optional[int]:
    return self.resolved.eos_id

  @property
  def unk_id(self) -> Optional[int]:
    return self.resolved.unk_id

  @property
  def pad_id(self) -> int:
    return self.resolved.pad_id

  @property
  def vocab_size(self) -> int:
    return self.resolved.vocab_size

  @property
  def _base_vocab_size(self) -> int:
    return self.resolved.vocab_size

  def encode(self, s):
    return self.resolved.encode(s)

  def decode(self, ids):
    return self.resolved.decode(ids)

  def encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    return self.resolved.encode_tf(s)

  def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    return self.resolved.decode_tf(ids)

  def _encode(self, s):
    return self.resolved.encode(s)

  def _decode(self, ids):
    return self.resolved.decode(ids)

  def _encode_tf(self, s):
    return self.resolved.encode_tf(s)

  def _decode_tf(self, ids):
    return self.resolved.decode_tf(ids)

  def __eq__(self, other) -> bool:
    return isinstance(other, ConfiguredVocabulary) or self.resolved == other

  def __hash__(self) -> int:
    return hash(ConfiguredVocabulary)

  def __str__(self) -> str:
    return f"ConfiguredVocabulary({self.resolved})"


VOCABULARY = ConfiguredVocabulary()
HASH_BUCKETS = 2**31 - 2
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(VOCABULARY, add_eos=False, required=False),
    "targets": seqio.Feature(VOCABULARY, add_eos=True),
    # [1] int32 hash of `example_id`: survives mixing and packing, so training can log which examples it saw.
    "example_hash": seqio.Feature(seqio.PassThroughVocabulary(HASH_BUCKETS + 1), add_eos=False, required=False,
                                  dtype=tf.int32),
}


def add_example_hash(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Adds `example_hash` = [1 + hash(example_id)] (int32, never 0: 0 is padding) to every example."""
  def add(features):
    digest = tf.strings.to_hash_bucket_fast(features["example_id"], HASH_BUCKETS) + 1
    return {**features, "example_hash": tf.cast(digest, tf.int32)[tf.newaxis]}
  return dataset.map(add, num_parallel_calls=tf.data.AUTOTUNE)


def example_hash(example_id: str) -> int:
  """The `example_hash` of an id, computed in Python the way the pipeline does."""
  return int(tf.strings.to_hash_bucket_fast(example_id, HASH_BUCKETS)) + 1


# Offline caches (`python -m teacherlm_jax.prepare`) hold the examples up to the CacheDatasetPlaceholder: hashed and tokenized.
PREPROCESSORS = (add_example_hash, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                 seqio.preprocessors.append_eos_after_trim)


def register_task(name: str, source: sources.RenderedSource, metric_fns: Sequence = ()) -> seqio.Task:
  """Registers (or replaces) a seqio Task over `source` with the shared features and preprocessors."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  source.task_name = name  # the key of its persisted scans (`sources.persisted_scans`)
  return seqio.TaskRegistry.add(name, source=source, preprocessors=list(PREPROCESSORS),
                                output_features=OUTPUT_FEATURES, metric_fns=list(metric_fns),
                                shuffle_buffer_size=10_000)


def register_mixture(name: str, task_names: Sequence[str], rate=None) -> seqio.Mixture:
  """Registers (or replaces) a mixture; the default rate is each task's (capped) number of training examples."""
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  rate = rate or examples_rate
  return seqio.MixtureRegistry.add(name, [(task, rate) for task in task_names])


@gin.configurable
def examples_rate(task: seqio.Task, maximum: Optional[float] = None, temperature: float = 1.0,
                  weights: Optional[Mapping[str, float]] = None) -> float:
  """Examples-proportional mixing rate, as `seqio.mixing_rate_num_examples`: weight * min(n, maximum)^(1/T).

  n is the task's number of (capped) training examples, so with the defaults every example is seen about once per
  epoch; the caps are applied inside the sources (3,000 per P3 prompt, 30,000 per Muffin task), so a capped corpus
  weighs what it contributes, not what it has on disk. `weights` multiplies a task's rate by its name (default 1).
  For a cached task (seqio's offline caches, `python -m teacherlm_jax.prepare`) n comes from the cache's stats,
  with no scan. In gin (train.gin's macros): MIXING_RATE_MAXIMUM, MIXING_RATE_TEMPERATURE, MIXING_WEIGHTS.
  """
  if temperature <= 0:
    raise ValueError(f"mixing temperature {temperature} must be > 0")
  count = float(num_train_examples(task))
  if maximum is not None:
    count = min(count, float(maximum))
  return float((weights or {}).get(task.name, 1.0)) * count ** (1.0 / temperature)


def num_train_examples(task: seqio.Task) -> int:
  """The task's training examples: from its cache's stats when cached, else its source's (capped) count."""
  if task.supports_caching and task.cache_dir:
    return int(task.get_cached_stats("train")["examples"])
  return int(task.num_input_examples("train"))


def continuation(text: str) -> str:
  """A target that continues its input after one space (inputs and targets are concatenated as tokens)."""
  return " " + text.strip()
