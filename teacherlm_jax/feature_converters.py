"""Feature conversion for BLOOM: decoder-only, inputs and targets concatenated, loss on targets, packing."""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf


class CausalLMFeatureConverter(seqio.PrefixLMFeatureConverter):
  """seqio's prefix-LM conversion without the prefix's bidirectional mask: BLOOM attends causally everywhere.

  Each example becomes `inputs + targets` (targets end with EOS). Model features, each [batch, length]:
    decoder_input_tokens    the sequence shifted right (0 first)
    decoder_target_tokens   the sequence
    decoder_loss_weights    1 on targets (on every token with loss_on_targets_only=False), 0 on padding
    decoder_segment_ids, decoder_positions   (packing only) which example a token belongs to, and where in it
  With `pack=True` several examples share a row, and `segment_ids` keep them from attending to each other. The model
  feature length is inputs + targets length.
  """

  MODEL_FEATURES = {name: spec for name, spec in seqio.PrefixLMFeatureConverter.MODEL_FEATURES.items()
                    if name != "decoder_causal_attention"}

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
    converted = dict(super()._convert_example(features))
    converted.pop("decoder_causal_attention", None)
    return converted

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    lengths.pop("decoder_causal_attention", None)
    return lengths
