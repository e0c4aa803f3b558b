"""Feature conversion for decoder-only models: inputs and targets concatenated, loss on targets, packing."""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

Spec = seqio.FeatureConverter.FeatureSpec
EXAMPLE_HASH = "example_hash"


class CausalLMFeatureConverter(seqio.FeatureConverter):
  """Each example becomes `inputs + targets` (targets end with EOS), read causally by the model.

  Model features, each int32 [batch, length] with length = inputs length + targets length:
    decoder_input_tokens    the sequence shifted right, `bos_id` first (and at the start of every packed example): the
                            vocabulary's BOS for a family whose tokenizer prepends one (OPT, Llama, Mistral), else 0
    decoder_target_tokens   the sequence
    decoder_loss_weights    1 on targets (on every token with loss_on_targets_only=False), 0 on padding
    decoder_segment_ids, decoder_positions   (packing only) which example a token belongs to, and where in it
    example_hash            (with_example_hash only) the `example_hash` of each example in the row, 0-padded
  With `pack=True` several examples share a row, and the segment ids keep them from attending to each other.
  With `keep_last_tokens=True` an example longer than inputs + targets length keeps its last tokens (as the official
  release, which keeps the last 2,048), instead of its first; give it untrimmed task features.
  (seqio's own converters refuse extra features when packing; this one packs `example_hash` with the tokens, so
  training can account for every example it consumed.)
  """

  TASK_FEATURES = {"inputs": Spec(dtype=tf.int32), "targets": Spec(dtype=tf.int32)}
  MODEL_FEATURES = {"decoder_target_tokens": Spec(dtype=tf.int32), "decoder_input_tokens": Spec(dtype=tf.int32),
                    "decoder_loss_weights": Spec(dtype=tf.int32)}
  PACKING_FEATURE_DTYPES = {"decoder_segment_ids": tf.int32, "decoder_positions": tf.int32}

  def __init__(self, pack: bool = True, loss_on_targets_only: bool = True, with_example_hash: bool = False,
               bos_id: int = 0, keep_last_tokens: bool = False):
    super().__init__(pack=pack, use_custom_packing_ops=False, apply_length_check=not keep_last_tokens,
                     bos_id=bos_id)
    self._loss_on_targets_only = loss_on_targets_only
    self._keep_last_tokens = keep_last_tokens
    self._with_example_hash = with_example_hash
    if with_example_hash:
      self.TASK_FEATURES = {**type(self).TASK_FEATURES, EXAMPLE_HASH: Spec(dtype=tf.int32)}
      self.MODEL_FEATURES = {**type(self).MODEL_FEATURES, EXAMPLE_HASH: Spec(dtype=tf.int32)}

  def _concatenate(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    inputs, targets = features["inputs"], features["targets"]
    # 1 = input token, 2 = target token: seqio's packing treats 0 as padding (it measures an example by its non-zero
    # values), so no real position may be 0. Id 0 is an ordinary token in some vocabularies (Llama 3, Qwen2): tokens
    # are packed as id + 1 and shifted back after, and segments come from the roles.
    input_roles = tf.ones_like(inputs) if self._loss_on_targets_only else tf.fill(tf.shape(inputs), 2)
    concatenated = {"tokens": tf.concat([inputs, targets], axis=0) + 1,
                    "roles": tf.concat([input_roles, tf.fill(tf.shape(targets), 2)], axis=0)}
    if self._with_example_hash:
      concatenated[EXAMPLE_HASH] = features[EXAMPLE_HASH]
    return concatenated

  def _to_model_features(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    real = features["roles"] != 0
    tokens = tf.where(real, features["tokens"] - 1, 0)
    segment_ids = features.get("roles_segment_ids")
    inputs = seqio.utils.make_autoregressive_inputs(tokens, sequence_id=segment_ids, bos_id=self.bos_id)
    model = {"decoder_target_tokens": tokens,
             "decoder_input_tokens": tf.where(real, inputs, 0),
             "decoder_loss_weights": tf.cast(features["roles"] == 2, tf.int32)}
    if self.pack:
      model["decoder_segment_ids"] = segment_ids
      model["decoder_positions"] = features["roles_positions"]
    if self._with_example_hash:
      model[EXAMPLE_HASH] = features[EXAMPLE_HASH]
    return model

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    length = task_feature_lengths["inputs"] + task_feature_lengths["targets"]
    lengths = {"tokens": length, "roles": length}
    if self._with_example_hash:
      lengths[EXAMPLE_HASH] = task_feature_lengths[EXAMPLE_HASH]
    ds = ds.map(self._concatenate, num_parallel_calls=tf.data.AUTOTUNE)
    if self._keep_last_tokens:
      ds = ds.map(lambda f: {name: value[-length:] if name in ("tokens", "roles") else value
                             for name, value in f.items()}, num_parallel_calls=tf.data.AUTOTUNE)
    ds = seqio.utils.trim_and_pack_dataset(ds, lengths) if self.pack else seqio.utils.trim_and_pad_dataset(
        ds, lengths)
    return ds.map(self._to_model_features, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    length = task_feature_lengths["inputs"] + task_feature_lengths["targets"]
    lengths = {name: length for name in type(self).MODEL_FEATURES}
    if self.pack:
      lengths.update({name: length for name in self.PACKING_FEATURE_DTYPES})
    if self._with_example_hash:
      lengths[EXAMPLE_HASH] = task_feature_lengths[EXAMPLE_HASH]
    return lengths
