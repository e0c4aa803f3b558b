"""A record as a teacher (or a student) sees it: the question with its options inlined, and the answer.

Record formats (`record_format`; `auto` picks per record by the fields present):

  question_answer       `question` (options already inlined, as in the official release's files; a leading "Q: " is
                        dropped) and `answer` (`(C)`, `C`, or free text); with `options_field` set, the options are
                        inlined here and the answer may also be a 0-based index or the text of an option. Field names
                        are configurable.
  ecqa                  raw ECQA: q_text, q_op1..q_op5, q_ans (the answer letter is the last matching option)
  creak                 raw CREAK: sentence, label (true/false)
  strategyqa            raw StrategyQA: question, answer (true/false)
  rank_classification   our evaluation tasks' features: inputs `[header]Q: {question} A: The answer is (`, targets `C`

`auto` takes ecqa when `q_text` is present, creak for `sentence` + `label`, rank_classification for `inputs` +
`targets`, strategyqa when `answer` is a boolean, else question_answer. Problems raise `formats.BadRecord` naming the
file, line and field.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Sequence

from tasks import evaluation, formats, rendering

RECORD_FORMATS = ("auto", "question_answer", "ecqa", "creak", "strategyqa", "rank_classification")


@dataclasses.dataclass(frozen=True)
class Fields:
  """Field names of the question_answer format."""

  question: str = "question"
  answer: str = "answer"
  options: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Sample:
  """A record as the teachers see it: the question (options inlined) and the answer (`(C)` or text)."""

  question: str
  answer: str

  def prompt(self, teacher: str) -> str:
    return rendering.teacher_prompt(self.question, self.answer, teacher)


def strip_q_prefix(question: str) -> str:
  return question[3:] if question.startswith("Q: ") else question


def option_letter(location: formats.Location, answer: Any, options: Sequence[str], field: str) -> str:
  """The letter of the right option, from a letter (`C` / `(C)`), a 0-based index or the option's text."""
  if isinstance(answer, bool) or not isinstance(answer, (int, str)):
    raise formats.BadRecord(location, field, f"expected a letter, an index or an option, got {answer!r:.40}")
  if isinstance(answer, int):
    index = answer
  elif re.fullmatch(r"\s*\(?[A-Z]\)?\s*", answer):
    index = rendering.LETTERS.index(rendering.answer_letter(answer))
  elif answer in options:
    index = list(options).index(answer)
  else:
    raise formats.BadRecord(location, field, f"{answer!r} is neither a letter, an index nor one of the options")
  if not 0 <= index < len(options):
    raise formats.BadRecord(location, field, f"answer {answer!r} is out of range for {len(options)} options")
  return rendering.LETTERS[index]


def detect_format(record: formats.Record) -> str:
  """The record format `auto` picks for a record."""
  if "q_text" in record:
    return "ecqa"
  if "sentence" in record and "label" in record:
    return "creak"
  if "inputs" in record and "targets" in record:
    return "rank_classification"
  if isinstance(record.get("answer"), bool):
    return "strategyqa"
  return "question_answer"


def sample(location: formats.Location, record: formats.Record, record_format: str = "auto",
           fields: Fields = Fields()) -> Sample:
  """The record as a Sample; raises `formats.BadRecord` naming the field that is wrong."""
  if record_format not in RECORD_FORMATS:
    raise ValueError(f"record_format {record_format!r} is not one of {RECORD_FORMATS}")
  record_format = detect_format(record) if record_format == "auto" else record_format
  if record_format == "ecqa":
    question, letter = evaluation.ecqa_question_and_letter(location, record)
    return Sample(question, f"({letter})")
  if record_format in ("creak", "strategyqa"):
    features = (evaluation.render_creak if record_format == "creak" else evaluation.render_strategyqa)(location,
                                                                                                        record)
    return _from_rank_classification(location, features)
  if record_format == "rank_classification":
    return _from_rank_classification(location, record)
  return _question_answer(fields, location, record)


def _from_rank_classification(location: formats.Location, record: formats.Record) -> Sample:
  formats.check_fields(location, record, {"inputs": str, "targets": str})
  inputs = record["inputs"]
  start = inputs.find("Q: ")
  if start < 0 or not inputs.endswith(rendering.ANSWER_PREFIX):
    raise formats.BadRecord(location, "inputs", f"expected '[header]Q: ...{rendering.ANSWER_PREFIX}', got "
                                                f"{inputs[-60:]!r}")
  question = inputs[start + len("Q: "):-len(rendering.ANSWER_PREFIX)]
  return Sample(question, f"({_letter(location, record['targets'], 'targets')})")


def _question_answer(fields: Fields, location: formats.Location, record: formats.Record) -> Sample:
  if fields.options:
    formats.check_fields(location, record, {fields.question: str, fields.options: list})
    if record.get(fields.answer) is None:
      raise formats.BadRecord(location, fields.answer, "missing")
    options = record[fields.options]
    letter = option_letter(location, record[fields.answer], options, fields.answer)
    return Sample(rendering.multiple_choice_question(record[fields.question], options), f"({letter})")
  formats.check_fields(location, record, {fields.question: str, fields.answer: str})
  return Sample(strip_q_prefix(record[fields.question].strip()), record[fields.answer].strip())


def _letter(location: formats.Location, answer: str, field: str) -> str:
  try:
    return rendering.answer_letter(answer)
  except ValueError as error:
    raise formats.BadRecord(location, field, str(error)) from error


