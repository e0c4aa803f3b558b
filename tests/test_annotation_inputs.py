"""Annotation inputs: JSONL / TFDS / seqio records -> teacher prompts exactly as PROMPTS.md, bad records located."""

import json

import pytest
import tensorflow_datasets as tfds

from tasks import formats
from teacherlm_jax import annotation_inputs as inputs

ECQA = {"q_text": "Where is a plate kept?", "q_op1": "sink", "q_op2": "cupboard", "q_op3": "floor", "q_op4": "roof",
        "q_op5": "car", "q_ans": "cupboard"}
ECQA_PROMPT = ("Q: Where is a plate kept? (A) sink (B) cupboard (C) floor (D) roof (E) car A: The answer is (B). "
               "Let's think step by step.")


def _write(path, lines):
  path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                            for line in lines))
  return str(path)


def _samples(spec):
  """[(index, Sample or BadRecord)] of every input item."""
  results = []
  for index, location, record in inputs.iter_items(spec):
    try:
      results.append((index, record if isinstance(record, formats.BadRecord) else
                      inputs.sample(spec, location, record)))
    except formats.BadRecord as error:
      results.append((index, error))
  return results


def test_every_record_format_renders_the_release_prompt(tmp_path):
  path = _write(tmp_path / "mixed.jsonl", [
      {"question": "Where is a plate kept? (A) sink (B) cupboard (C) floor (D) roof (E) car", "answer": "(B)"},
      ECQA,
      {"sentence": "Cats can fly.", "label": "false"},
      {"question": "Do cats fly?", "answer": False},
      {"inputs": "Q: Where is a plate kept? (A) sink (B) cupboard (C) floor (D) roof (E) car A: The answer is (",
       "targets": "B"},
      {"question": "Q:  Where is a plate kept? (A) sink (B) cupboard (C) floor (D) roof (E) car  ", "answer": "B"},
  ])
  prompts = [sample.prompt("cot") for _, sample in _samples(inputs.InputSpec(path))]
  assert prompts[0] == prompts[1] == prompts[4] == prompts[5] == ECQA_PROMPT
  assert prompts[2] == ("Q: Determine the correctness of the following sentence. Cats can fly. (A) True (B) False "
                        "A: The answer is (B). Let's think step by step.")
  assert prompts[3] == "Q: Do cats fly? (A) Yes (B) No A: The answer is (B). Let's think step by step."
  spec = inputs.InputSpec(path)
  fundamental = inputs.sample(spec, formats.Location(path, 2), ECQA).prompt("fundamental")
  assert fundamental.endswith("A: The answer is (B). The fundamental of this question is:")


def test_options_field_takes_letters_indices_and_option_texts(tmp_path):
  options = ["sink", "cupboard", "floor", "roof", "car"]
  path = _write(tmp_path / "mc.jsonl", [{"q": "Where is a plate kept?", "choices": options, "gold": gold}
                                        for gold in ("B", "(B)", 1, "cupboard", 7, "attic")])
  spec = inputs.InputSpec(path, question_field="q", answer_field="gold", options_field="choices")
  results = _samples(spec)
  assert [s.prompt("cot") for _, s in results[:4]] == [ECQA_PROMPT] * 4
  assert "out of range for 5 options" in str(results[4][1]) and "line 5" in str(results[4][1])
  assert "neither a letter, an index nor one of the options" in str(results[5][1])


def test_bad_records_name_the_file_line_and_field(tmp_path):
  path = _write(tmp_path / "bad.jsonl", [
      {"question": "ok?", "answer": "(A)"},
      b'{"question": "broken',
      b'{"question": "caf\xe9?", "answer": "(A)"}',
      {"answer": "(A)"},
      {"question": "no answer"},
      {"question": "x", "answer": "(A)", "cot": "already annotated"},
      [1, 2],
      {"q_text": "ecqa without its answer", "q_op1": "a", "q_op2": "b", "q_op3": "c", "q_op4": "d", "q_op5": "e",
       "q_ans": "z"},
  ])
  results = _samples(inputs.InputSpec(path))
  assert [i for i, _ in results] == list(range(8))
  errors = [r for _, r in results[1:]]
  assert all(isinstance(e, formats.BadRecord) for e in errors)
  assert [(e.location.line, e.field) for e in errors] == [(2, None), (3, None), (4, "question"), (5, "answer"),
                                                          (6, "cot"), (7, None), (8, "q_ans")]
  assert "invalid JSON" in errors[0].reason and "not valid UTF-8" in errors[1].reason
  assert "overwrite" in errors[4].reason and "expected a JSON object" in errors[5].reason
  assert str(errors[2]).startswith(f"{path} line 4, field 'question': missing")


def test_globs_read_files_in_order_and_count(tmp_path):
  _write(tmp_path / "b.jsonl", [{"question": "b?", "answer": "(A)"}])
  _write(tmp_path / "a.jsonl", [{"question": "a1?", "answer": "(A)"}, {"question": "a2?", "answer": "(B)"}])
  (tmp_path / "a.jsonl").write_text((tmp_path / "a.jsonl").read_text() + "\n\n")  # blank lines are no records
  spec = inputs.InputSpec(str(tmp_path / "*.jsonl"))
  assert [s.question for _, s in _samples(spec)] == ["a1?", "a2?", "b?"]
  assert inputs.count_items(spec) == 3
  assert [(n, [i for i, _, _ in items]) for n, items in inputs.chunks(inputs.iter_items(spec), 2)] == [
      (0, [0, 1]), (1, [2])]
  with pytest.raises(FileNotFoundError, match="no input files match"):
    list(inputs.iter_items(inputs.InputSpec(str(tmp_path / "none*.jsonl"))))
  with pytest.raises(ValueError, match="record_format"):
    inputs.InputSpec("x.jsonl", record_format="csv")


class TinyQa(tfds.core.GeneratorBasedBuilder):
  """A small real TFDS dataset, prepared locally by the test (no download)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "question": tfds.features.Text(), "choices": tfds.features.Sequence(tfds.features.Text()),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(5):
      yield i, {"question": f"Which is number {i % 3}?", "choices": ["zero", "one", "two"], "label": i % 3}


def test_a_prepared_tfds_split_is_an_input(tmp_path):
  TinyQa(data_dir=str(tmp_path)).download_and_prepare()
  spec = inputs.InputSpec("tfds:tiny_qa:train", question_field="question", answer_field="label",
                          options_field="choices", tfds_data_dir=str(tmp_path))
  assert inputs.count_items(spec) == 5
  results = _samples(spec)
  assert len(results) == 5
  for _, sample in results:
    number = int(sample.question.split("number ")[1][0])
    assert sample.answer == f"({'ABC'[number]})"
    assert sample.question.endswith("(A) zero (B) one (C) two")
  with pytest.raises(FileNotFoundError, match="not prepared"):
    list(inputs.iter_items(inputs.InputSpec("tfds:tiny_qa:train", tfds_data_dir=str(tmp_path / "elsewhere"))))


def test_a_seqio_evaluation_task_is_an_input():
  spec = inputs.InputSpec("seqio:teacherlm_eval_creak:validation")
  first = next(inputs.iter_items(spec))
  assert str(first[1]) == "seqio:teacherlm_eval_creak:validation record 1"
  raw = json.loads(open("tasks/data/creak/validation.jsonl").readline())
  direct = inputs.sample(spec, first[1], raw)
  assert inputs.sample(spec, first[1], first[2]) == direct
  assert direct.prompt("cot").startswith(f"Q: Determine the correctness of the following sentence. {raw['sentence']}")
  with pytest.raises(ValueError, match="mixture"):
    list(inputs.iter_items(inputs.InputSpec("seqio:teacherlm_stage1_multitask:train")))
