"""CausalLMFeatureConverter: concatenation, loss on targets only, packing with segments and positions."""

import numpy as np
import tensorflow as tf

from teacherlm_jax import feature_converters


def _convert(examples, lengths, **kwargs):
  dataset = tf.data.Dataset.from_generator(
      lambda: iter(examples),
      output_signature={"inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)})
  converter = feature_converters.CausalLMFeatureConverter(**kwargs)
  return list(converter(dataset, lengths).as_numpy_iterator())


def test_packed_examples_with_loss_on_targets_only():
  examples = [{"inputs": [7, 8, 5], "targets": [3, 9, 1]}, {"inputs": [8, 4], "targets": [4, 1]}]
  (row,) = _convert(examples, {"inputs": 6, "targets": 6}, pack=True)
  assert "decoder_causal_attention" not in row
  np.testing.assert_array_equal(row["decoder_target_tokens"], [7, 8, 5, 3, 9, 1, 8, 4, 4, 1, 0, 0])
  np.testing.assert_array_equal(row["decoder_input_tokens"], [0, 7, 8, 5, 3, 9, 0, 8, 4, 4, 0, 0])
  np.testing.assert_array_equal(row["decoder_loss_weights"], [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(row["decoder_segment_ids"], [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0])
  np.testing.assert_array_equal(row["decoder_positions"], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 0])


def test_id_zero_tokens_and_bos_for_families_that_prepend_it():
  """Id 0 is an ordinary token in Llama 3 / Qwen2 vocabularies: packing takes segments from the roles, so it stays in
  its example; with bos_id every example's first input is BOS (OPT, Llama and Mistral prepend one)."""
  examples = [{"inputs": [7, 0, 5], "targets": [0, 9, 1]}, {"inputs": [0], "targets": [4, 1]}]
  (row,) = _convert(examples, {"inputs": 5, "targets": 5}, pack=True, bos_id=509)
  np.testing.assert_array_equal(row["decoder_target_tokens"], [7, 0, 5, 0, 9, 1, 0, 4, 1, 0])
  np.testing.assert_array_equal(row["decoder_input_tokens"], [509, 7, 0, 5, 0, 9, 509, 0, 4, 0])
  np.testing.assert_array_equal(row["decoder_segment_ids"], [1, 1, 1, 1, 1, 1, 2, 2, 2, 0])
  np.testing.assert_array_equal(row["decoder_positions"], [0, 1, 2, 3, 4, 5, 0, 1, 2, 0])
  np.testing.assert_array_equal(row["decoder_loss_weights"], [0, 0, 0, 1, 1, 1, 0, 1, 1, 0])


def test_unpacked_loss_on_the_whole_sequence():
  examples = [{"inputs": [7, 8], "targets": [3, 1]}]
  (row,) = _convert(examples, {"inputs": 3, "targets": 3}, pack=False, loss_on_targets_only=False)
  assert set(row) == {"decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights"}
  np.testing.assert_array_equal(row["decoder_target_tokens"], [7, 8, 3, 1, 0, 0])
  np.testing.assert_array_equal(row["decoder_loss_weights"], [1, 1, 1, 1, 0, 0])


def test_model_feature_lengths():
  converter = feature_converters.CausalLMFeatureConverter()
  assert converter.get_model_feature_lengths({"inputs": 5, "targets": 7}) == {
      "decoder_target_tokens": 12, "decoder_input_tokens": 12, "decoder_loss_weights": 12,
      "decoder_segment_ids": 12, "decoder_positions": 12}


def test_example_hashes_are_packed_with_their_examples():
  examples = [{"inputs": [7, 8], "targets": [3, 1], "example_hash": [11]},
              {"inputs": [5], "targets": [4, 1], "example_hash": [22]},
              {"inputs": [9, 9, 9], "targets": [6, 6, 1], "example_hash": [33]}]
  dataset = tf.data.Dataset.from_generator(
      lambda: iter(examples), output_signature={name: tf.TensorSpec([None], tf.int32) for name in examples[0]})
  converter = feature_converters.CausalLMFeatureConverter(pack=True, with_example_hash=True)
  rows = list(converter(dataset, {"inputs": 4, "targets": 4, "example_hash": 8}).as_numpy_iterator())
  assert [list(row["example_hash"][row["example_hash"] != 0]) for row in rows] == [[11, 22], [33]]
  np.testing.assert_array_equal(rows[0]["decoder_segment_ids"], [1, 1, 1, 1, 2, 2, 2, 0])
  np.testing.assert_array_equal(rows[1]["decoder_loss_weights"], [0, 0, 0, 1, 1, 1, 0, 0])


def test_over_long_examples_keep_their_last_tokens():
  examples = [{"inputs": [7, 8, 5, 6], "targets": [3, 9, 4, 1]}, {"inputs": [], "targets": [2, 3, 1]}]
  rows = _convert(examples, {"inputs": 3, "targets": 3}, pack=False, keep_last_tokens=True)
  np.testing.assert_array_equal(rows[0]["decoder_target_tokens"], [5, 6, 3, 9, 4, 1])  # the last 6, EOS kept
  np.testing.assert_array_equal(rows[0]["decoder_loss_weights"], [0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(rows[1]["decoder_target_tokens"], [2, 3, 1, 0, 0, 0])
