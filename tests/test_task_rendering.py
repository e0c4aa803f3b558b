"""Prompt rendering is byte-identical to the official release's formats (../shared/datasets/PROMPTS.md)."""

import json
import pathlib
import re

import pytest

from tasks import evaluation, formats, rendering

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"
EMBEDDED = pathlib.Path(__file__).resolve().parents[1] / "tasks" / "data"

# Row 0 of ecqa_test.jsonl and creak_dev.jsonl as released by the TeacherLM authors (the `test`, `question` and
# `answer` fields were rendered by their pipeline); inlined so the test does not depend on ../shared being present.
ECQA_ROW = {
    "q_text": "What kind of people will someone who is in charge of project look for?",
    "q_op1": "greedy", "q_op2": "worry", "q_op3": "have knowledge", "q_op4": "take charge", "q_op5": "boss",
    "q_ans": "have knowledge",
    "test": "Q: What kind of people will someone who is in charge of project look for? (A) greedy (B) worry (C) have "
            "knowledge (D) take charge (E) boss A: The answer is (",
    "answer": "(C)",
}
CREAK_ROW = {
    "sentence": "Eating soup means eating only solids.", "label": "false",
    "question": "Determine the correctness of the following sentence. Eating soup means eating only solids. (A) True "
                "(B) False",
    "answer": "(B)",
}
LOCATION = formats.Location("row", 1)


def test_ecqa_eval_context_equals_the_release():
  features = evaluation.render_ecqa(LOCATION, ECQA_ROW)
  assert features["inputs"] == ECQA_ROW["test"]
  assert features["targets"] == "C" and features["options"] == "A B C D E"


def test_creak_eval_context_and_answer_equal_the_release():
  features = evaluation.render_creak(LOCATION, CREAK_ROW)
  assert features["inputs"] == f"Q: {CREAK_ROW['question']} A: The answer is ("
  assert f"({features['targets']})" == CREAK_ROW["answer"] and features["options"] == "A B"


def test_mmlu_context_follows_prompts_md():
  record = {"question": "Which organelle makes ATP\nin eukaryotic cells", "A": "Nucleus", "B": "Mitochondrion",
            "C": "Ribosome\nand more", "D": "Golgi apparatus", "answer": "B"}
  features = evaluation.render_mmlu(formats.Location("/x/college_biology_test.csv", 3), record)
  assert features["inputs"] == (
      "The following are multiple choice questions (with answers) about college biology. "
      "Q: Which organelle makes ATP in eukaryotic cells. (A) Nucleus (B) Mitochondrion (C) Ribosome and more "
      "(D) Golgi apparatus A: The answer is (")
  assert (features["targets"], features["subject"], features["category"]) == ("B", "college_biology", "STEM")


@pytest.mark.parametrize("ending", [".", ",", "?", "!", '"'])
def test_mmlu_question_with_final_punctuation_gets_no_period(ending):
  context = rendering.mmlu_context("world_religions", f"Who is it{ending}", ["a", "b", "c", "d"])
  assert f"Q: Who is it{ending} (A) a" in context


def test_annotation_prompts_use_the_official_triggers():
  question = rendering.multiple_choice_question(ECQA_ROW["q_text"], [ECQA_ROW[f"q_op{i}"] for i in range(1, 6)])
  rendered = rendering.rendered_sample(question, "(C)")
  assert rendered == ECQA_ROW["test"] + "C)."
  assert rendering.teacher_prompt(question, "(C)", "cot") == rendered + " Let's think step by step."
  assert rendering.teacher_prompt(question, "C", "common_mistakes") == rendered + " The common mistakes are:"
  assert rendering.teacher_prompt(question, "(C)", "fundamental") == (
      rendered + " The fundamental of this question is:")


def test_the_space_rule_is_the_releases_byte_for_byte():
  # PROMPTS.md: one pass of replace("  ", " "): a run of three spaces leaves two, a run of four leaves two; then,
  # if the text ends with a space, strip(" ") (both ends)
  assert rendering.remove_duplicated_block("a  b") == "a b"
  assert rendering.remove_duplicated_block("a   b") == "a  b"
  assert rendering.remove_duplicated_block("a    b") == "a  b"
  assert rendering.remove_duplicated_block("a     b") == "a   b"
  assert rendering.remove_duplicated_block(" a b  ") == "a b"  # ends with a space: both ends stripped
  assert rendering.remove_duplicated_block(" a b") == " a b"  # does not: the leading space stays
  assert rendering.remove_duplicated_block("a b   ") == "a b"  # "a b  " after the pass, then stripped
  assert rendering.teacher_prompt("Is  it   so?", "(A)", "cot") == (
      "Q: Is it  so? A: The answer is (A). Let's think step by step.")


def test_creak_annotation_question():
  assert rendering.creak_question(CREAK_ROW["sentence"]) == CREAK_ROW["question"]


def test_ecqa_duplicate_options_take_the_last_match_like_the_release():
  row = {**ECQA_ROW, "q_op2": "have knowledge"}  # options 2 and 3 equal the answer
  assert evaluation.render_ecqa(LOCATION, row)["targets"] == "C"
  with pytest.raises(formats.BadRecord, match="field 'q_ans'.*none of the options"):
    evaluation.render_ecqa(LOCATION, {**ECQA_ROW, "q_ans": "nobody"})


def _release_space_rule(text):
  """The release's `remove_duplicated_block`, written out as PROMPTS.md states it."""
  text = text.replace("  ", " ")
  if text.endswith(" "):
    text = text.strip(" ")
  return text


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/datasets is not beside this checkout")
def test_every_shared_annotation_prompt_is_the_releases():
  collapsing = 0
  for dataset, render in (("ecqa_test.jsonl", evaluation.ecqa_question_and_letter), ("creak_dev.jsonl", None)):
    for line_number, line in enumerate((SHARED / dataset).read_text().splitlines(), start=1):
      row = json.loads(line)
      if render:
        question, letter = render(formats.Location(dataset, line_number), row)
      else:
        question, letter = rendering.creak_question(row["sentence"]), "A" if row["label"] == "true" else "B"
      for teacher, (trigger, _, _) in rendering.TEACHERS.items():
        released_question = row["question"][3:] if row["question"].startswith("Q: ") else row["question"]
        release = _release_space_rule(f"Q: {released_question} A: The answer is {row['answer']}. {trigger}")
        assert rendering.teacher_prompt(question, f"({letter})", teacher) == release, (dataset, line_number)
      collapsing += re.sub(" {2,}", " ", release) != release
  assert collapsing == 18  # the ECQA prompts with a run of three spaces, where collapsing every run would differ


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/datasets is not beside this checkout")
def test_every_shared_ecqa_and_creak_row_renders_like_the_release():
  for line_number, line in enumerate((SHARED / "ecqa_test.jsonl").read_text().splitlines(), start=1):
    row = json.loads(line)
    features = evaluation.render_ecqa(formats.Location("ecqa", line_number), row)
    assert features["inputs"] == row["test"] and f"({features['targets']})" == row["answer"], line_number
  for line_number, line in enumerate((SHARED / "creak_dev.jsonl").read_text().splitlines(), start=1):
    row = json.loads(line)
    features = evaluation.render_creak(formats.Location("creak", line_number), row)
    assert features["inputs"] == f"Q: {row['question']} A: The answer is (", line_number
    assert f"({features['targets']})" == row["answer"], line_number


def test_embedded_teacherdata_renders_its_ecqa_questions():
  first = json.loads((EMBEDDED / "teacherdata" / "train.jsonl").read_text().splitlines()[0])
  assert rendering.answer_letter(first["answer"]) in "ABCDE"
  assert rendering.rendered_sample(first["question"], first["answer"]).startswith(f"Q: {first['question']} A: The")
