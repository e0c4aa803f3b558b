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

import tensorflow as tf

from tasks import config, formats, rendering
from tasks.registration import continuation, register_mixture, register_task
from tasks.sources import Group, RenderedSource, list_files

SPLITS = ("train", "validation")
TEACHERDATA_FIELDS = {"id": str, "task": str, "question": str, "answer": str, "fundamentals": str,
                      "chain_of_thought": str, "common_mistakes": str}
STAGE3_TEACHERS = tuple(rendering.TEACHERS)  # fundamental, cot, common_mistakes


def per_directory_groups(root: str, split: str) -> list[Group]:
  """One group per sub-directory (a P3 prompt / a Muffin task) holding `<split>.jsonl` or `<split>.tfrecord*`."""
  groups = []
  for directory in sorted(tf.io.gfile.listdir(root)):
    path = os.path.join(root, directory.rstrip("/"))
    if not tf.io.gfile.isdir(path):
      continue
    files = list_files(os.path.join(path, f"{split}.jsonl")) + list_files(os.path.join(path, f"{split}.tfrecord*"))
    groups.append(Group(f"{os.path.basename(root.rstrip('/'))}/{directory.rstrip('/')}", tuple(files)))
  return groups


def single_group(root: str, split: str) -> list[Group]:
  """All of a corpus' `<split>.jsonl`, `<split>-*.jsonl` and `<split>.tfrecord*` files as one group."""
  patterns = (f"{split}.jsonl", f"{split}-*.jsonl", f"{split}.tfrecord*")
  files = [path for pattern in patterns for path in list_files(os.path.join(root, pattern))]
  return [Group(f"{os.path.basename(root.rstrip('/'))}/{split}", tuple(files))]


def render_inputs_targets(location: formats.Location, record: formats.Record) -> dict[str, str]:
  """P3 (`inputs_pretokenized` / `targets_pretokenized`) or Muffin (`inputs` / `targets`) records, kept verbatim."""
  keys = ("inputs_pretokenized", "targets_pretokenized") if "inputs_pretokenized" in record else ("inputs", "targets")
  formats.check_fields(location, record, {keys[0]: str, keys[1]: str})
  return {"inputs": record[keys[0]], "targets": continuation(record[keys[1]]), "example_id": _example_id(location)}


def render_teacherdata(location: formats.Location, record: formats.Record, teacher: str | None) -> dict[str, str]:
  """TeacherData: five-field target (teacher=None) or one teacher's trigger prompt and field."""
  formats.check_fields(location, record, TEACHERDATA_FIELDS)
  question, answer = record["question"], record["answer"]
  if teacher is None:
    inputs = rendering.rendered_sample(question, answer)
    targets = rendering.teaching_target(record["fundamentals"], record["chain_of_thought"],
                                        record["common_mistakes"])
  else:
    inputs = rendering.teacher_prompt(question, answer, teacher)
    targets = record[rendering.TEACHERS[teacher][2]]
  return {"inputs": inputs, "targets": continuation(targets), "example_id": record["id"]}


def _example_id(location: formats.Location) -> str:
  return f"{os.path.basename(os.path.dirname(location.path))}/{os.path.basename(location.path)}:{location.line}"


def register() -> None:
  features = ("inputs", "targets", "example_id")
  register_task("teacherlm_p3_sense_3k", RenderedSource(
      "p3_sense_3k", SPLITS, per_directory_groups, render_inputs_targets, features,
      cap=functools.partial(config.caps, "p3_sense_3k")))
  register_task("teacherlm_muffin_3w", RenderedSource(
      "muffin_3w", SPLITS, per_directory_groups, render_inputs_targets, features,
      cap=functools.partial(config.caps, "muffin_3w")))
  register_task("teacherlm_teacherdata_2m", RenderedSource(
      "teacherdata_2m", SPLITS, single_group, functools.partial(render_teacherdata, teacher=None), features))
  for teacher in STAGE3_TEACHERS:
    register_task(f"teacherlm_teacherdata_2m_{teacher}", RenderedSource(
        "teacherdata_2m", SPLITS, single_group, functools.partial(render_teacherdata, teacher=teacher), features))

  register_mixture("teacherlm_stage1_multitask", ["teacherlm_p3_sense_3k", "teacherlm_muffin_3w"])
  register_mixture("teacherlm_stage2_personalization", ["teacherlm_teacherdata_2m"], rate=1.0)
  for teacher in STAGE3_TEACHERS:
    register_mixture(f"teacherlm_stage3_{teacher}", [f"teacherlm_teacherdata_2m_{teacher}"], rate=1.0)
  register_mixture("teacherlm_direct_blend", ["teacherlm_p3_sense_3k", "teacherlm_muffin_3w",
                                              "teacherlm_teacherdata_2m"]
                   + [f"teacherlm_teacherdata_2m_{teacher}" for teacher in STAGE3_TEACHERS])
