"""The training corpora (P3-Sense-3K, Muffin-3W, TeacherData-2M) and the TeacherLM curriculum mixtures.

Tasks (features `inputs`, `targets`, `example_id`):
  teacherlm_p3_sense_3k                 P3 prompts, the first 3,000 valid training examples of each prompt
  teacherlm_muffin_3w                   Muffin (Flan 2021) tasks, the first 30,000 of each task
  teacherlm_teacherdata_2m              TeacherData, five-field teaching format (stage 2)
  teacherlm_teacherdata_2m_{fundamental,cot,common_mistakes}   one teacher's field after its trigger (stage 3)
Mixtures:
  teacherlm_stage1_multitask            P3-Sense-3K + Muffin-3W, rates = capped example counts
  teacherlm_stage2_personalization      TeacherData five-field
  teacherlm_stage3_{fundamental,cot,common_mistakes}
  teacherlm_direct_blend                all of the above in one mixture (the paper's single-stage ablation)
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

from tasks import config, formats, layouts, rendering, samples, students
from tasks.registration import continuation, register_mixture, register_task
from tasks.sources import RenderedSource

SPLITS = ("train", "validation")
TEACHER_FIELDS = ("fundamentals", "chain_of_thought", "common_mistakes")
ANNOTATION_FIELDS = {"fundamentals": "fundamental", "chain_of_thought": "cot", "common_mistakes": "error"}
STAGE3_TEACHERS = tuple(rendering.TEACHERS)  # fundamental, cot, common_mistakes


def render_inputs_targets(location: formats.Location, record: formats.Record) -> dict[str, str]:
  """P3 (`inputs_pretokenized` / `targets_pretokenized`) or Muffin (`inputs` / `targets`) records, kept verbatim."""
  keys = ("inputs_pretokenized", "targets_pretokenized") if "inputs_pretokenized" in record else ("inputs", "targets")
  formats.check_fields(location, record, {keys[0]: str, keys[1]: str})
  return {"inputs": record[keys[0]], "targets": continuation(record[keys[1]]), "example_id": _example_id(location)}


def teaching_fields(location: formats.Location, record: formats.Record, needed: Sequence[str] = TEACHER_FIELDS
                    ) -> dict[str, str]:
  """{id, question, answer, and the `needed` teacher fields} of a TeacherData record, by the configured field names
  (`config.teacherdata_fields`), or of an annotation-loop output record as it is (`fundamental`, `cot`, `error`)."""
  if all(field in record for field in ANNOTATION_FIELDS.values()):
    sample = samples.sample(location, {k: v for k, v in record.items() if k not in students.ANNOTATION_FIELDS})
    fields = {"question": sample.question, "answer": sample.answer}
    formats.check_fields(location, record, {ANNOTATION_FIELDS[name]: str for name in needed})
    fields.update({name: record[ANNOTATION_FIELDS[name]] for name in needed})
  else:
    names = config.teacherdata_fields()
    optional = {names[name]: str for name in ("id", "task") if names[name]}
    wanted = ("question", "answer") + tuple(needed)
    formats.check_fields(location, record, {names[name]: str for name in wanted}, optional)
    fields = {name: record[names[name]] for name in wanted}
  identifier = record.get(config.teacherdata_fields()["id"] or "id")
  fields["id"] = str(identifier) if identifier is not None else _example_id(location)
  return fields


def render_teacherdata(location: formats.Location, record: formats.Record, teacher: str | None) -> dict[str, str]:
  """TeacherData: five-field target (teacher=None) or one teacher's trigger prompt and field."""
  if teacher is None:
    fields = teaching_fields(location, record)
    inputs = rendering.rendered_sample(fields["question"], fields["answer"])
    targets = rendering.teaching_target(fields["fundamentals"], fields["chain_of_thought"],
                                        fields["common_mistakes"])
  else:
    field = rendering.TEACHERS[teacher][2]
    fields = teaching_fields(location, record, (field,))
    inputs = rendering.teacher_prompt(fields["question"], fields["answer"], teacher)
    targets = fields[field]
  return {"inputs": inputs, "targets": continuation(targets), "example_id": fields["id"]}


def _example_id(location: formats.Location) -> str:
  return f"{os.path.basename(os.path.dirname(location.path))}/{os.path.basename(location.path)}:{location.line}"


def register() -> None:
  features = ("inputs", "targets", "example_id")
  for corpus, name, groups in (("p3_sense_3k", "teacherlm_p3_sense_3k", layouts.p3),
                               ("muffin_3w", "teacherlm_muffin_3w", layouts.flan)):
    register_task(name, RenderedSource(
        corpus, SPLITS, groups, render_inputs_targets, features, cap=functools.partial(config.caps, corpus),
        subsample_seed=functools.partial(config.subsample, corpus)))
  teacherdata = functools.partial(layouts.single_group, prefix="teacherdata")
  register_task("teacherlm_teacherdata_2m", RenderedSource(
      "teacherdata_2m", SPLITS, teacherdata, functools.partial(render_teacherdata, teacher=None), features))
  for teacher in STAGE3_TEACHERS:
    register_task(f"teacherlm_teacherdata_2m_{teacher}", RenderedSource(
        "teacherdata_2m", SPLITS, teacherdata, functools.partial(render_teacherdata, teacher=teacher), features))

  register_mixture("teacherlm_stage1_multitask", ["teacherlm_p3_sense_3k", "teacherlm_muffin_3w"])
  register_mixture("teacherlm_stage2_personalization", ["teacherlm_teacherdata_2m"], rate=1.0)
  for teacher in STAGE3_TEACHERS:
    register_mixture(f"teacherlm_stage3_{teacher}", [f"teacherlm_teacherdata_2m_{teacher}"], rate=1.0)
  register_mixture("teacherlm_direct_blend", ["teacherlm_p3_sense_3k", "teacherlm_muffin_3w",
                                              "teacherlm_teacherdata_2m"]
                   + [f"teacherlm_teacherdata_2m_{teacher}" for teacher in STAGE3_TEACHERS])
