"""Prompt formats of the official TeacherLM release (`../shared/datasets/PROMPTS.md`), as plain string functions.

Annotation (teacher generation):
  rendered sample   `Q: {question} A: The answer is ({letter}).`
  teacher prompt    rendered sample + " " + trigger, with runs of spaces collapsed and trailing spaces stripped
Zero-shot evaluation (rank classification): the context ends with "(" and each option letter is a continuation.
  CREAK / ECQA / StrategyQA   `Q: {question} A: The answer is (`
  MMLU   `The following are multiple choice questions (with answers) about {subject}. Q: {question} (A) .. (D) .. A: The
          answer is (` (a question not ending in . , ? ! " gets a "."; newlines become spaces)

Where PROMPTS.md is silent we choose, and say so here:
  * StrategyQA's question is `{question} (A) Yes (B) No` (the CREAK pattern; A = yes).
  * A TeacherData answer that is not a single letter renders as `The answer is {answer}.`.
  * Stage 2's five-field teaching target is the three triggers in the order fundamental, CoT, common mistakes:
    `The fundamental of this question is: {f} Let's think step by step. {c} The common mistakes are: {m}`.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

LETTERS = string.ascii_uppercase
CREAK_PREFIX = "Determine the correctness of the following sentence."
MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}. "
ANSWER_PREFIX = " A: The answer is ("

# teacher name -> (trigger, field of the annotation output, field of a TeacherData record)
TEACHERS = {
    "fundamental": ("The fundamental of this question is:", "fundamental", "fundamentals"),
    "cot": ("Let's think step by step.", "cot", "chain_of_thought"),
    "common_mistakes": ("The common mistakes are:", "error", "common_mistakes"),
}


def remove_duplicated_block(text: str) -> str:
  """The release's space rule before generation, byte for byte (PROMPTS.md): one pass of `text.replace("  ", " ")`
  (each pair of spaces becomes one, left to right: a run of three spaces leaves two, a run of four leaves two), then,
  if the text ends with a space, `text.strip(" ")` (both ends)."""
  text = text.replace("  ", " ")
  return text.strip(" ") if text.endswith(" ") else text


def inline_options(options: Sequence[str]) -> str:
  """`(A) opt1 (B) opt2 ...`."""
  if len(options) > len(LETTERS):
    raise ValueError(f"{len(options)} options: at most {len(LETTERS)} are supported")
  return " ".join(f"({LETTERS[i]}) {option}" for i, option in enumerate(options))


def multiple_choice_question(question: str, options: Sequence[str]) -> str:
  """A question with its options inlined (ECQA / MMLU style), without the `Q: ` prefix."""
  return f"{question} {inline_options(options)}"


def creak_question(sentence: str) -> str:
  """`Determine the correctness of the following sentence. {sentence} (A) True (B) False`."""
  return f"{CREAK_PREFIX} {sentence} {inline_options(['True', 'False'])}"


def strategyqa_question(question: str) -> str:
  """`{question} (A) Yes (B) No` (our choice; PROMPTS.md names no StrategyQA question format)."""
  return f"{question} {inline_options(['Yes', 'No'])}"


def answer_letter(answer: str) -> str:
  """`(C)` or `C` -> `C`; raises ValueError for anything else."""
  match = re.fullmatch(r"\s*\(?([A-Z])\)?\s*", answer)
  if not match:
    raise ValueError(f"answer {answer!r} is not an option letter such as (C)")
  return match.group(1)


def answer_sentence(answer: str) -> str:
  """`The answer is (C).` for a letter answer, `The answer is {answer}.` otherwise."""
  try:
    return f"The answer is ({answer_letter(answer)})."
  except ValueError:
    return f"The answer is {answer.strip()}."


def rendered_sample(question: str, answer: str) -> str:
  """`Q: {question} A: The answer is ({letter}).`: what every teacher sees before its trigger."""
  return f"Q: {question} A: {answer_sentence(answer)}"


def teacher_prompt(question: str, answer: str, teacher: str) -> str:
  """The rendered sample plus one teacher's trigger, the release's space rule applied: the annotation / stage-3
  input."""
  trigger = TEACHERS[teacher][0]
  return remove_duplicated_block(f"{rendered_sample(question, answer)} {trigger}")


def teaching_target(fundamentals: str, chain_of_thought: str, common_mistakes: str) -> str:
  """Stage 2's five-field target: all three annotations, each after its trigger."""
  parts = [f"{TEACHERS['fundamental'][0]} {fundamentals}", f"{TEACHERS['cot'][0]} {chain_of_thought}",
           f"{TEACHERS['common_mistakes'][0]} {common_mistakes}"]
  return " ".join(parts)


def eval_context(question: str) -> str:
  """`Q: {question} A: The answer is (` for CREAK / ECQA / StrategyQA."""
  return f"Q: {question}{ANSWER_PREFIX}"


def mmlu_context(subject: str, question: str, options: Sequence[str]) -> str:
  """The MMLU zero-shot context of PROMPTS.md."""
  def clean(text: str) -> str:
    return text.replace("\r\n", " ").replace("\n", " ")
  question = clean(question).strip()
  if not question.endswith((".", ",", "?", "!", '"')):
    question += "."
  header = MMLU_HEADER.format(subject=subject.replace("_", " "))
  return f"{header}Q: {question} {inline_options([clean(o) for o in options])}{ANSWER_PREFIX}"
