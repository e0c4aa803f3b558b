"""Training input pipeline: every example once per epoch, exact resume by batch count, host shards."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from tasks import registration
from teacherlm_jax import input_pipeline

TEACHERDATA = pathlib.Path(__file__).resolve().parents[1] / "tasks" / "data" / "teacherdata" / "train.jsonl"
CONFIG = input_pipeline.DataConfig("teacherlm_stage2_personalization", {"inputs": 256, "targets": 768},
                                   batch_size=4, seed=1)


def _hashes(iterator):
  return [h for batch in iterator for h in input_pipeline.example_hashes(batch)]


def test_one_epoch_sees_every_example_exactly_once():
  seen = _hashes(input_pipeline.BatchIterator(CONFIG, num_epochs=1, process_index=0, process_count=1))
  ids = [json.loads(line)["id"] for line in TEACHERDATA.read_text().splitlines()]
  assert sorted(seen) == sorted(registration.example_hash(i) for i in ids)


def test_resume_by_skipping_consumed_batches_is_exact():
  uninterrupted = input_pipeline.BatchIterator(CONFIG, process_index=0, process_count=1)
  first = [next(uninterrupted) for _ in range(5)]
  resumed = input_pipeline.BatchIterator(CONFIG, batches_consumed=3, process_index=0, process_count=1)
  for expected in first[3:]:
    actual = next(resumed)
    for name in expected:
      np.testing.assert_array_equal(actual[name], expected[name])
  assert resumed.state() == {"mixture_or_task_name": "teacherlm_stage2_personalization", "seed": 1,
                             "batches_consumed": 5, "num_data_shards": 1}


def test_resume_from_saved_iterators_needs_no_replay(tmp_path):
  """Two data shards in one process: each shard's iterator saved at batch 3 continues exactly, with nothing
  skipped; a missing shard state is an error naming it."""
  config = dataclasses.replace(CONFIG, num_data_shards=2)
  uninterrupted = input_pipeline.BatchIterator(config, process_index=0, process_count=1)
  batches = [next(uninterrupted) for _ in range(6)]
  saved = input_pipeline.BatchIterator(config, process_index=0, process_count=1)
  for _ in range(3):
    next(saved)
  prefixes = saved.save(str(tmp_path / "state"))
  assert [pathlib.Path(p).name for p in prefixes] == ["shard-00000-of-00002", "shard-00001-of-00002"]
  assert input_pipeline.has_saved_state(str(tmp_path / "state"), range(2), 2)
  resumed = input_pipeline.BatchIterator(config, 3, restore_from=str(tmp_path / "state"), process_index=0,
                                         process_count=1)
  assert resumed.batches_skipped == 0
  for expected in batches[3:]:
    actual = next(resumed)
    for name in expected:
      np.testing.assert_array_equal(actual[name], expected[name])
  assert resumed.state()["batches_consumed"] == 6
  # process 1 of 2 reads shard 1 only, and finds its state there
  half = input_pipeline.BatchIterator(config, 3, restore_from=str(tmp_path / "state"), process_index=1,
                                      process_count=2)
  np.testing.assert_array_equal(next(half)["decoder_target_tokens"], batches[3]["decoder_target_tokens"][2:])
  (tmp_path / "state" / "shard-00001-of-00002.index").unlink()
  with pytest.raises(FileNotFoundError, match="shard-00001-of-00002: no saved input state for data shard 1 of 2"):
    input_pipeline.BatchIterator(config, 3, restore_from=str(tmp_path / "state"), process_index=0, process_count=1)


def test_two_processes_read_disjoint_halves_of_the_global_batch():
  halves = [_hashes(input_pipeline.BatchIterator(CONFIG, num_epochs=1, process_index=i, process_count=2))
            for i in range(2)]
  assert not set(halves[0]) & set(halves[1])
  everything = _hashes(input_pipeline.BatchIterator(CONFIG, num_epochs=1, process_index=0, process_count=1))
  assert len(set(halves[0]) | set(halves[1])) >= len(everything) - 8  # drop_remainder may drop a last partial batch
  batch = next(input_pipeline.BatchIterator(CONFIG, process_index=0, process_count=2))
  assert batch["decoder_target_tokens"].shape == (2, 1024)


def test_examples_start_with_bos_for_families_that_prepend_it(clean_task_config):
  """With a Llama 3 tokenizer (BOS <|begin_of_text|> = 509) every packed example's first input is BOS; with bytes
  (no BOS) it is 0, as before."""
  import gin
  from teacherlm_jax import vocabularies
  tokenizer = pathlib.Path(__file__).parent / "fixtures" / "hf_llama_tiny" / "tokenizer.json"
  gin.bind_parameter("task_vocabulary.vocabulary", vocabularies.HfTokenizerVocabulary(str(tokenizer)))
  batch = next(input_pipeline.BatchIterator(CONFIG, process_index=0, process_count=1))
  starts = (batch["decoder_positions"] == 0) & (batch["decoder_segment_ids"] != 0)
  assert starts.sum() >= 4 and np.all(batch["decoder_input_tokens"][starts] == 509)
  assert np.all(batch["decoder_input_tokens"][~starts & (batch["decoder_segment_ids"] != 0)] != 509)
  gin.clear_config()
  batch = next(input_pipeline.BatchIterator(CONFIG, process_index=0, process_count=1))
  starts = (batch["decoder_positions"] == 0) & (batch["decoder_segment_ids"] != 0)
  assert np.all(batch["decoder_input_tokens"][starts] == 0)
