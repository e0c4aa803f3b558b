"""Zero-shot rank-classification evaluation tasks, rendered exactly as PROMPTS.md.

Features: `inputs` (the context, ending with "("), `targets` (the gold option letter), `options` (the candidate
letters, space-separated, e.g. "A B C D E"), `example_id`, and for MMLU `subject` and `category`.

  teacherlm_eval_mmlu, teacherlm_eval_mmlu_<subject>   splits dev / validation / test (Hendrycks dev / val / test)
  teacherlm_eval_creak        CREAK JSONL (sentence, label true/false); splits train / validation
  teacherlm_eval_ecqa         ECQA JSONL (q_text, q_op1..q_op5, q_ans); splits train / validation / test
  teacherlm_eval_strategyqa   StrategyQA JSONL (question, answer true/false); splits train / validation
"""

from __future__ import annotations

import os

from tasks import formats, mmlu_subjects, rendering
from tasks.registration import register_task
from tasks.sources import Group, RenderedSource, list_files

MMLU_SPLIT_DIRS = {"dev": "dev", "validation": "val", "test": "test"}
MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")
EVAL_FEATURES = ("inputs", "targets", "options", "example_id")
ECQA_OPTIONS = tuple(f"q_op{i}" for i in range(1, 6))


def mmlu_groups(root: str, split: str, subject: str | None = None) -> list[Group]:
  """One group per subject file `<root>/<dir>/<subject>_<dir>.csv` (only `subject` when given)."""
  directory = MMLU_SPLIT_DIRS[split]
  pattern = f"{subject or '*'}_{directory}.csv"
  files = list_files(os.path.join(root, directory, pattern))
  return [Group(f"mmlu/{os.path.basename(path)[:-len(f'_{directory}.csv')]}", (path,)) for path in files]


def render_mmlu(location: formats.Location, record: formats.Record) -> dict[str, str]:
  formats.check_fields(location, record, {column: str for column in MMLU_COLUMNS})
  subject = os.path.basename(location.path).rsplit("_", 1)[0]
  answer = record["answer"].strip()
  if answer not in "ABCD" or len(answer) != 1:
    raise formats.BadRecord(location, "answer", f"expected one of A, B, C, D, got {record['answer']!r}")
  context = rendering.mmlu_context(subject, record["question"], [record[letter] for letter in "ABCD"])
  return {"inputs": context, "targets": answer, "options": "A B C D", "example_id": _example_id(location),
          "subject": subject, "category": mmlu_subjects.category(subject)}


def split_file_groups(root: str, split: str) -> list[Group]:
  """`<root>/<split>.jsonl` as one group."""
  return [Group(f"{os.path.basename(root.rstrip('/'))}/{split}", tuple(list_files(os.path.join(root,
                                                                                              f"{split}.jsonl"))))]


def render_creak(location: formats.Location, record: formats.Record) -> dict[str, str]:
  formats.check_fields(location, record, {"sentence": str, "label": str})
  label = record["label"].strip().lower()
  if label not in ("true", "false"):
    raise formats.BadRecord(location, "label", f"expected 'true' or 'false', got {record['label']!r}")
  return _mc_features(location, rendering.creak_question(record["sentence"]), 2, "A" if label == "true" else "B",
                      record.get("ex_id"))


def ecqa_question_and_letter(location: formats.Location, record: formats.Record) -> tuple[str, str]:
  """ECQA's question with its five options inlined, and the letter of `q_ans`."""
  formats.check_fields(location, record, {"q_text": str, "q_ans": str, **{name: str for name in ECQA_OPTIONS}})
  options = [record[name] for name in ECQA_OPTIONS]
  matches = [i for i, option in enumerate(options) if option == record["q_ans"]]
  if not matches:
    raise formats.BadRecord(location, "q_ans", f"{record['q_ans']!r} is none of the options {options}")
  # A few ECQA rows repeat an option; the official release's answer letter is then the last match.
  return rendering.multiple_choice_question(record["q_text"], options), rendering.LETTERS[matches[-1]]


def render_ecqa(location: formats.Location, record: formats.Record) -> dict[str, str]:
  question, letter = ecqa_question_and_letter(location, record)
  return _mc_features(location, question, 5, letter, record.get("q_no"))


def render_strategyqa(location: formats.Location, record: formats.Record) -> dict[str, str]:
  formats.check_fields(location, record, {"question": str, "answer": bool})
  question = rendering.strategyqa_question(record["question"])
  return _mc_features(location, question, 2, "A" if record["answer"] else "B", record.get("qid"))


def _mc_features(location: formats.Location, question: str, num_options: int, letter: str,
                 example_id) -> dict[str, str]:
  return {"inputs": rendering.eval_context(question), "targets": letter,
          "options": " ".join(rendering.LETTERS[:num_options]),
          "example_id": str(example_id) if example_id is not None else _example_id(location)}


def _example_id(location: formats.Location) -> str:
  return f"{os.path.basename(location.path)}:{location.line}"


def register() -> None:
  mmlu_features = EVAL_FEATURES + ("subject", "category")
  register_task("teacherlm_eval_mmlu", RenderedSource("mmlu", tuple(MMLU_SPLIT_DIRS), mmlu_groups, render_mmlu,
                                                       mmlu_features, csv_columns=MMLU_COLUMNS))
  for subject in mmlu_subjects.SUBJECTS:
    groups = lambda root, split, subject=subject: mmlu_groups(root, split, subject)  # noqa: E731
    register_task(f"teacherlm_eval_mmlu_{subject}", RenderedSource(
        "mmlu", tuple(MMLU_SPLIT_DIRS), groups, render_mmlu, mmlu_features, csv_columns=MMLU_COLUMNS))
  register_task("teacherlm_eval_creak", RenderedSource("creak", ("train", "validation"), split_file_groups,
                                                       render_creak, EVAL_FEATURES))
  register_task("teacherlm_eval_ecqa", RenderedSource("ecqa", ("train", "validation", "test"), split_file_groups,
                                                      render_ecqa, EVAL_FEATURES))
  register_task("teacherlm_eval_strategyqa", RenderedSource("strategyqa", ("train", "validation"),
                                                            split_file_groups, render_strategyqa, EVAL_FEATURES))
