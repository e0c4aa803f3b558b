"""The registry: every mixture yields batches on the embedded data, names, gin-configured datasets and vocabulary."""

import json
import pathlib

import gin
import numpy as np
import pytest
import seqio

import tasks
from tasks import sources, students
from teacherlm_jax import feature_converters, vocabularies

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MIXTURES = ["teacherlm_stage1_multitask", "teacherlm_stage2_personalization", "teacherlm_stage3_fundamental",
            "teacherlm_stage3_cot", "teacherlm_stage3_common_mistakes", "teacherlm_direct_blend"]
LENGTHS = {"inputs": 96, "targets": 160}


@pytest.fixture(autouse=True)
def clean_gin():
  yield
  gin.clear_config()
  sources.clear_scan_cache()


def _batches(name, split="train", pack=True, batch_size=4, count=2, **kwargs):
  dataset = seqio.get_dataset(name, task_feature_lengths=LENGTHS, dataset_split=split, shuffle=True, seed=3,
                              num_epochs=1, feature_converter=feature_converters.CausalLMFeatureConverter(pack=pack),
                              **kwargs)
  return list(dataset.batch(batch_size, drop_remainder=True).take(count).as_numpy_iterator())


@pytest.mark.parametrize("name", MIXTURES)
def test_every_mixture_yields_packed_batches(name):
  batches = _batches(name)
  assert len(batches) == 2
  expected = {"decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights", "decoder_segment_ids",
              "decoder_positions"}
  for batch in batches:
    assert set(batch) == expected
    for feature in expected:
      assert batch[feature].shape == (4, LENGTHS["inputs"] + LENGTHS["targets"]) and batch[feature].dtype == np.int32
    assert batch["decoder_loss_weights"].sum() > 0
    assert batch["decoder_segment_ids"].max() >= 1


def test_registered_names():
  names = tasks.all_names()
  for name in MIXTURES + ["teacherlm_p3_sense_3k", "teacherlm_muffin_3w", "teacherlm_teacherdata_2m",
                          "teacherlm_eval_mmlu", "teacherlm_eval_mmlu_college_biology", "teacherlm_eval_creak",
                          "teacherlm_eval_ecqa", "teacherlm_eval_strategyqa"]:
    assert name in names
  assert sum(name.startswith("teacherlm_eval_mmlu_") for name in names) == 57


@pytest.mark.parametrize("name,split,count,options", [
    ("teacherlm_eval_mmlu", "test", 18, "A B C D"), ("teacherlm_eval_mmlu_world_religions", "dev", 5, "A B C D"),
    ("teacherlm_eval_creak", "validation", 100, "A B"), ("teacherlm_eval_ecqa", "test", 100, "A B C D E"),
    ("teacherlm_eval_strategyqa", "validation", 10, "A B")])
def test_evaluation_tasks_on_embedded_data(name, split, count, options):
  task = tasks.get_mixture_or_task(name)
  examples = list(task.get_dataset(sequence_length=None, split=split, shuffle=False).as_numpy_iterator())
  assert len(examples) == count == task.num_input_examples(split)
  assert all(e["options"].decode() == options for e in examples)
  assert all(e["inputs_pretokenized"].decode().endswith("A: The answer is (") for e in examples)
  assert all(e["targets_pretokenized"].decode() in options.split() for e in examples)


def test_unknown_name_suggests_close_names():
  with pytest.raises(ValueError, match=r"closest: \['teacherlm_stage2_personalization'"):
    tasks.get_mixture_or_task("teacherlm_stage2_personalisation")


def test_unknown_name_without_our_tasks_says_to_import_tasks(monkeypatch):
  monkeypatch.setattr(tasks.registry, "all_names", lambda: ["some_other_task"])
  with pytest.raises(ValueError, match="add `import tasks`"):
    tasks.get_mixture_or_task("teacherlm_stage9")


def test_gin_configured_vocabulary_tokenizes_every_task():
  tokenizer = str(FIXTURES / "tokenizer" / "tokenizer.json")
  gin.bind_parameter("task_vocabulary.vocabulary", vocabularies.HfTokenizerVocabulary(tokenizer))
  example = next(tasks.get_mixture_or_task("teacherlm_teacherdata_2m_cot").get_dataset(
      sequence_length=None, split="validation", shuffle=False).as_numpy_iterator())
  vocabulary = vocabularies.HfTokenizerVocabulary(tokenizer)
  assert list(example["inputs"]) == vocabulary.encode(example["inputs_pretokenized"].decode())
  assert example["targets"][-1] == vocabulary.eos_id


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def test_gin_only_multiple_choice_adapter(tmp_path):
  rows = [{"q": "Which is a fruit?", "choices": ["car", "apple", "rock"], "gold": 1, "topic": "food"},
          {"q": "Sky colour", "choices": ["blue", "green"], "gold": "(A)", "topic": "nature"},
          {"q": "2+2?", "choices": ["3", "4"], "gold": "4", "topic": "math"}]
  path = _write_jsonl(tmp_path / "quiz.jsonl", rows)
  gin.parse_config([
      "from tasks import students",
      f"students.user_datasets.multiple_choice = [{{'name': 'quiz', 'paths': {{'test': '{path}'}}, "
      "'question_field': 'q', 'options_field': 'choices', 'answer_field': 'gold', 'subject_field': 'topic'}]"])
  evaluation = tasks.get_mixture_or_task("teacherlm_eval_quiz")
  examples = list(evaluation.get_dataset(sequence_length=None, split="test", shuffle=False).as_numpy_iterator())
  assert [e["inputs_pretokenized"].decode() for e in examples] == [
      "Q: Which is a fruit? (A) car (B) apple (C) rock A: The answer is (",
      "Q: Sky colour (A) blue (B) green A: The answer is (",
      "Q: 2+2? (A) 3 (B) 4 A: The answer is ("]
  assert [e["targets_pretokenized"].decode() for e in examples] == ["B", "A", "B"]
  assert [e["subject"].decode() for e in examples] == ["food", "nature", "math"]
  student = tasks.get_mixture_or_task("teacherlm_student_quiz")
  first = next(student.get_dataset(sequence_length=None, split="test", shuffle=False).as_numpy_iterator())
  assert first["inputs_pretokenized"].decode() == "Q: Which is a fruit? (A) car (B) apple (C) rock A:"
  assert first["targets_pretokenized"].decode() == " The answer is (B)."


def test_student_variants_from_an_annotated_jsonl(tmp_path):
  record = {"id": "x1", "question": "Q: Is ice cold? (A) True (B) False", "answer": "(A)",
            "fundamental": "Ice is frozen water.", "cot": "Ice is below 0 C, so it is cold.",
            "error": "Thinking ice is warm.", "all": "Q: Is ice cold? (A) True (B) False A: The answer is (A). "
                                                   "Let's think step by step. Ice is below 0 C."}
  path = _write_jsonl(tmp_path / "annotated.jsonl", [record])
  names = students.register_annotated("icy", {"train": path})
  assert names == [f"teacherlm_student_icy_{v}" for v in students.VARIANTS]
  rendered = {}
  for variant in students.VARIANTS:
    example = next(tasks.get_mixture_or_task(f"teacherlm_student_icy_{variant}").get_dataset(
        sequence_length=None, split="train", shuffle=False).as_numpy_iterator())
    rendered[variant] = (example["inputs_pretokenized"].decode(), example["targets_pretokenized"].decode())
  question = "Q: Is ice cold? (A) True (B) False A:"
  assert rendered["answer_only"] == (question, " The answer is (A).")
  assert rendered["cot"] == (question, " The answer is (A). Let's think step by step. Ice is below 0 C, so it is cold.")
  assert rendered["fundamental"] == (question, " The answer is (A). The fundamental of this question is: Ice is "
                                               "frozen water.")
  assert rendered["common_mistakes"] == (question, " The answer is (A). The common mistakes are: Thinking ice is "
                                                   "warm.")
  assert rendered["all"] == ("", record["all"])


def test_annotated_record_missing_its_variant_field_names_it(tmp_path):
  path = _write_jsonl(tmp_path / "annotated.jsonl", [{"question": "q?", "answer": "(A)", "cot": "because"}])
  students.register_annotated("partial", {"train": path})
  with pytest.raises(Exception, match=r"annotated.jsonl line 1, field 'fundamental': missing"):
    tasks.get_mixture_or_task("teacherlm_student_partial_fundamental").get_dataset(
        sequence_length=None, split="train", shuffle=False)


def test_teacherdata_from_tfrecord_shards(tmp_path):
  import tensorflow as tf
  rows = [json.loads(line) for line in (pathlib.Path(tasks.config.EMBEDDED_DATA) / "teacherdata" /
                                         "validation.jsonl").read_text().splitlines()]
  for shard, part in enumerate((rows[:25], rows[25:])):
    with tf.io.TFRecordWriter(str(tmp_path / f"train.tfrecord-{shard:05d}-of-00002")) as writer:
      for row in part:
        feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()])) for k, v in row.items()}
        writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
  gin.bind_parameter("data_root.teacherdata_2m", str(tmp_path))
  task = tasks.get_mixture_or_task("teacherlm_teacherdata_2m_fundamental")
  examples = list(task.get_dataset(sequence_length=None, split="train", shuffle=False).as_numpy_iterator())
  assert [e["example_id"].decode() for e in examples] == [row["id"] for row in rows]
  assert examples[0]["targets_pretokenized"].decode() == " " + rows[0]["fundamentals"].strip()


def test_students_from_annotated_raw_records_with_empty_annotations(tmp_path):
  """The annotation loop keeps records in their own format (raw CREAK here); an annotation may be empty."""
  record = {"ex_id": "dev_1", "sentence": "Ice is cold.", "label": "true", "fundamental": "", "cot": "It is frozen.",
            "error": "", "all": "Q: ... Let's think step by step. It is frozen.", "provenance": {"index": 0}}
  path = _write_jsonl(tmp_path / "annotated.jsonl", [record])
  students.register_annotated("raw", {"train": path})
  def first(variant):
    example = next(tasks.get_mixture_or_task(f"teacherlm_student_raw_{variant}").get_dataset(
        sequence_length=None, split="train", shuffle=False).as_numpy_iterator())
    return example["inputs_pretokenized"].decode(), example["targets_pretokenized"].decode()
  question = "Q: Determine the correctness of the following sentence. Ice is cold. (A) True (B) False A:"
  assert first("cot") == (question, " The answer is (A). Let's think step by step. It is frozen.")
  assert first("fundamental") == (question, " The answer is (A). The fundamental of this question is:")
