"""Student tasks from an annotated JSONL (the annotation loop's output), and from any multiple-choice JSONL (gin only).

Annotated records carry the original record (in any format of `tasks.samples`: the release's `question` with the
options inlined and `answer` "(C)", raw ECQA, raw CREAK, ...), and the teachers' `fundamental`, `cot`, `error` (common
mistakes) and `all` (prompt + generation, what the official release trains on); an annotation may be empty (the
teacher stopped at once). Student variants, all with inputs `Q: {question} A:`:

  answer_only       targets ` The answer is (C).`
  fundamental       ` The answer is (C). The fundamental of this question is: {fundamental}`
  cot               ` The answer is (C). Let's think step by step. {cot}`
  common_mistakes   ` The answer is (C). The common mistakes are: {error}`
  all               no inputs; targets = `all` (the release's cot_tail training text)

Register from Python with `register_annotated(name, {"train": path, ...})` (tasks
`teacherlm_student_<name>_<variant>`), or from gin:

  from tasks import students
  students.user_datasets.annotated = [{'name': 'creak_aug', 'paths': {'train': '/out/creak/annotated.jsonl'}}]
  students.user_datasets.multiple_choice = [{
      'name': 'my_quiz', 'paths': {'train': '/data/quiz_train.jsonl', 'test': '/data/quiz_test.jsonl'},
      'question_field': 'q', 'options_field': 'choices', 'answer_field': 'gold', 'subject_field': 'topic'}]

A multiple-choice dataset registers `teacherlm_eval_<name>` (rank classification, like ECQA) and
`teacherlm_student_<name>` (answer_only). `options_field` names a list field; `answer_field` may hold a letter
("C" or "(C)"), a 0-based index, or the text of the right option.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

import gin

from tasks import formats, rendering, samples
from tasks.registration import continuation, register_task
from tasks.sources import Group, RenderedSource, list_files

VARIANTS = ("answer_only", "fundamental", "cot", "common_mistakes", "all")
VARIANT_FIELDS = {"fundamental": "fundamental", "cot": "cot", "common_mistakes": "error", "all": "all"}
VARIANT_TRIGGERS = {"fundamental": "fundamental", "cot": "cot", "common_mistakes": "common_mistakes"}
ANNOTATION_FIELDS = ("fundamental", "cot", "error", "all", "provenance")
FEATURES = ("inputs", "targets", "example_id")
EVAL_FEATURES = ("inputs", "targets", "options", "example_id", "subject")


def _path_groups(name: str, paths: Mapping[str, str]):
  def groups(root: str, split: str) -> list[Group]:
    del root  # user datasets name their files directly
    return [Group(f"{name}/{split}", tuple(list_files(paths[split])))]
  return groups


def render_annotated(location: formats.Location, record: formats.Record, variant: str) -> dict[str, str]:
  """One student variant of an annotated record."""
  field = VARIANT_FIELDS.get(variant)
  if field and not isinstance(record.get(field), str):
    reason = "missing" if record.get(field) is None else f"expected a string, got {type(record[field]).__name__}"
    raise formats.BadRecord(location, field, reason)
  example_id = str(record.get("id", f"{location.path}:{location.line}"))
  if variant == "all":
    formats.check_fields(location, record, {"all": str})
    return {"inputs": "", "targets": record["all"], "example_id": example_id}
  sample = samples.sample(location, {k: v for k, v in record.items() if k not in ANNOTATION_FIELDS})
  question, targets = sample.question, rendering.answer_sentence(sample.answer)
  if field:
    targets += f" {rendering.TEACHERS[VARIANT_TRIGGERS[variant]][0]} {record[field].strip()}"
  return {"inputs": f"Q: {question} A:", "targets": continuation(targets), "example_id": example_id}


def register_annotated(name: str, paths: Mapping[str, str]) -> list[str]:
  """Registers `teacherlm_student_<name>_<variant>` for every variant; `paths` maps split -> file (glob)."""
  names = []
  for variant in VARIANTS:
    task_name = f"teacherlm_student_{name}_{variant}"
    register_task(task_name, RenderedSource(
        None, tuple(paths), _path_groups(name, paths), functools.partial(render_annotated, variant=variant),
        FEATURES))
    names.append(task_name)
  return names


@functools.lru_cache(maxsize=None)
def _cached_renderer(question_field: str, options_field: str, answer_field: str, subject_field: Optional[str],
                     for_eval: bool):
  return functools.partial(render_multiple_choice, question_field=question_field, options_field=options_field,
                           answer_field=answer_field, subject_field=subject_field, for_eval=for_eval)


def render_multiple_choice(location: formats.Location, record: formats.Record, *, question_field: str,
                           options_field: str, answer_field: str, subject_field: Optional[str],
                           for_eval: bool) -> dict[str, str]:
  """A user's multiple-choice record as an evaluation example or an answer_only student example."""
  formats.check_fields(location, record, {question_field: str, options_field: list},
                       {subject_field: str} if subject_field else {})
  if answer_field not in record or record[answer_field] is None:
    raise formats.BadRecord(location, answer_field, "missing")
  options = record[options_field]
  letter = samples.option_letter(location, record[answer_field], options, answer_field)
  question = rendering.multiple_choice_question(record[question_field], options)
  example_id = str(record.get("id", f"{location.path}:{location.line}"))
  if not for_eval:
    return {"inputs": f"Q: {question} A:", "targets": continuation(f"The answer is ({letter}).") ,
            "example_id": example_id}
  return {"inputs": rendering.eval_context(question), "targets": letter,
          "options": " ".join(rendering.LETTERS[:len(options)]), "example_id": example_id,
          "subject": record.get(subject_field, "") if subject_field else ""}


def register_multiple_choice(name: str, paths: Mapping[str, str], question_field: str, options_field: str,
                             answer_field: str, subject_field: Optional[str] = None) -> list[str]:
  """Registers `teacherlm_eval_<name>` and `teacherlm_student_<name>` from a user's multiple-choice JSONL."""
  fields = (question_field, options_field, answer_field, subject_field)
  register_task(f"teacherlm_eval_{name}", RenderedSource(
      None, tuple(paths), _path_groups(name, paths), _cached_renderer(*fields, True), EVAL_FEATURES))
  register_task(f"teacherlm_student_{name}", RenderedSource(
      None, tuple(paths), _path_groups(name, paths), _cached_renderer(*fields, False), FEATURES))
  return [f"teacherlm_eval_{name}", f"teacherlm_student_{name}"]


@gin.configurable
def user_datasets(annotated: Sequence[Mapping[str, Any]] = (),
                  multiple_choice: Sequence[Mapping[str, Any]] = ()) -> list[str]:
  """Registers the datasets named in gin (see the module docstring); returns the task names."""
  names = []
  for spec in annotated:
    names += register_annotated(spec["name"], spec["paths"])
  for spec in multiple_choice:
    names += register_multiple_choice(**spec)
  return names
