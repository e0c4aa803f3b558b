"""What the annotation loop reads: records from JSONL files, a TFDS split or a seqio task, turned into teacher prompts.

Inputs (`InputSpec.source`):
  `path/to/data.jsonl` or a glob (`data/*.jsonl`, files in sorted order)   one JSON object per line
  `tfds:NAME[/CONFIG][:VERSION]:SPLIT`   a prepared TFDS dataset under `tfds_data_dir` (nothing is downloaded)
  `seqio:TASK_OR_MIXTURE:SPLIT`          the records of a registered seqio task's source (`import tasks` registers ours)

Every input item gets an index (0, 1, ... in input order, bad records included): the key of the output order, of
the per-record sampling seed and of the chunking. A record becomes a sample (question with its options inlined, and
its answer) by its format (`record_format`, default `auto`, which picks per record by the fields present):

  question_answer       `question` (options already inlined, as in the official release's files) and `answer`
                        (`(C)`, `C`, or free text); with `options_field` set, the options are inlined here and the
                        answer may also be a 0-based index or the text of an option. Field names are configurable.
  ecqa                  raw ECQA: q_text, q_op1..q_op5, q_ans (the answer letter is the last matching option)
  creak                 raw CREAK: sentence, label (true/false)
  strategyqa            raw StrategyQA: question, answer (true/false)
  rank_classification   our evaluation tasks' features: inputs `[header]Q: {question} A: The answer is (`, targets
                        `C` (so `seqio:teacherlm_eval_ecqa:test` can be annotated)

`auto` takes ecqa when `q_text` is present, creak for `sentence` + `label`, rank_classification for `inputs` +
`targets`, strategyqa when `answer` is a boolean, else question_answer. The teacher prompt is then
`tasks.rendering.teacher_prompt` (PROMPTS.md). Records that cannot be read or rendered are `formats.BadRecord`s
naming the file, the line (or record number) and the field; the loop writes them to the rejects file.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterator, Optional, Union

import numpy as np
import tensorflow as tf

from tasks import formats, samples, sources

OUTPUT_FIELDS = ("fundamental", "cot", "error", "all", "provenance")
RECORD_FORMATS = samples.RECORD_FORMATS
Sample = samples.Sample
Item = tuple[int, formats.Location, Union[formats.Record, formats.BadRecord]]


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """Where the records come from and how a record becomes a sample (see the module docstring)."""

  source: str
  record_format: str = "auto"
  question_field: str = "question"
  answer_field: str = "answer"
  options_field: Optional[str] = None
  tfds_data_dir: Optional[str] = None

  def __post_init__(self):
    if self.record_format not in RECORD_FORMATS:
      raise ValueError(f"record_format {self.record_format!r} is not one of {RECORD_FORMATS}")


def iter_items(spec: InputSpec) -> Iterator[Item]:
  """(index, location, record or BadRecord) for every input record, in input order."""
  if spec.source.startswith("tfds:"):
    located = _iter_tfds(spec.source[len("tfds:"):], spec.tfds_data_dir)
  elif spec.source.startswith("seqio:"):
    located = _iter_seqio(spec.source[len("seqio:"):])
  else:
    located = _iter_jsonl_files(spec.source)
  for index, (location, record) in enumerate(located):
    yield index, location, record


def count_items(spec: InputSpec) -> Optional[int]:
  """The number of input records, when it is cheap to know (JSONL lines, TFDS split sizes); else None."""
  if spec.source.startswith("seqio:"):
    return None
  if spec.source.startswith("tfds:"):
    name, split = _tfds_name_split(spec.source[len("tfds:"):])
    return int(_tfds_builder(name, spec.tfds_data_dir).info.splits[split].num_examples)
  total = 0
  for path in _jsonl_files(spec.source):
    with tf.io.gfile.GFile(path, "rb") as handle:
      total += sum(1 for line in handle if line.strip())
  return total


def chunks(items: Iterator[Item], chunk_size: int) -> Iterator[tuple[int, list[Item]]]:
  """(chunk number, items) of `chunk_size` consecutive items (the last chunk may be shorter)."""
  for number in itertools.count():
    chunk = list(itertools.islice(items, chunk_size))
    if not chunk:
      return
    yield number, chunk


def _jsonl_files(pattern: str) -> list[str]:
  files = sources.list_files(pattern)
  if not files:
    raise FileNotFoundError(f"no input files match {pattern!r} (expected JSONL, or tfds:NAME:SPLIT, or "
                            "seqio:TASK:SPLIT)")
  for path in files:
    if not path.endswith(".jsonl"):
      raise ValueError(f"{path}: input files must be JSONL (.jsonl); for TFDS or seqio use tfds:... or seqio:...")
  return files


def _iter_jsonl_files(pattern: str) -> Iterator[tuple[formats.Location, Any]]:
  for path in _jsonl_files(pattern):
    yield from formats.iter_jsonl(path)


def _tfds_name_split(name_split: str) -> tuple[str, str]:
  name, _, split = name_split.rpartition(":")
  if not name or not split:
    raise ValueError(f"tfds input {name_split!r}: expected tfds:NAME[/CONFIG][:VERSION]:SPLIT")
  return name, split


def _tfds_builder(name: str, data_dir: Optional[str]):
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared under {builder.data_dir}; prepare it first "
                            "(nothing is downloaded at run time) or set tfds_data_dir")
  return builder


def _iter_tfds(name_split: str, data_dir: Optional[str]) -> Iterator[tuple[formats.Location, Any]]:
  name, split = _tfds_name_split(name_split)
  dataset = _tfds_builder(name, data_dir).as_dataset(split=split, shuffle_files=False)
  yield from _numpy_records(dataset, f"tfds:{name_split}")


def _iter_seqio(name_split: str) -> Iterator[tuple[formats.Location, Any]]:
  import tasks  # noqa: F401  (registers our tasks)
  from tasks import registry
  name, _, split = name_split.rpartition(":")
  if not name or not split:
    raise ValueError(f"seqio input {name_split!r}: expected seqio:TASK_OR_MIXTURE:SPLIT")
  task = registry.get_mixture_or_task(name)
  if not hasattr(task, "source"):
    raise ValueError(f"seqio input {name!r} is a mixture; give one of its tasks")
  yield from _numpy_records(task.source.get_dataset(split=split, shuffle=False), f"seqio:{name_split}")


def _numpy_records(dataset: tf.data.Dataset, where: str) -> Iterator[tuple[formats.Location, Any]]:
  for number, example in enumerate(dataset.as_numpy_iterator(), start=1):
    location = formats.Location(where, number, unit="record")
    try:
      yield location, {key: _plain(value, key, location) for key, value in example.items()}
    except formats.BadRecord as error:
      yield location, error


def _plain(value: Any, field: str, location: formats.Location) -> Any:
  """A TFDS / seqio feature as JSON-able Python (bytes -> UTF-8 str)."""
  if isinstance(value, dict):
    return {key: _plain(inner, f"{field}.{key}", location) for key, inner in value.items()}
  if isinstance(value, np.ndarray):
    return [_plain(inner, field, location) for inner in value.tolist()] if value.ndim else _plain(value.item(),
                                                                                                  field, location)
  if isinstance(value, (list, tuple)):
    return [_plain(inner, field, location) for inner in value]
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as error:
      raise formats.BadRecord(location, field, f"not valid UTF-8 ({error.reason} at byte {error.start})")
  return value.item() if isinstance(value, np.generic) else value


def sample(spec: InputSpec, location: formats.Location, record: formats.Record) -> samples.Sample:
  """The record as a Sample (`tasks.samples`); a record that already has an output field is refused, since
  annotating it would overwrite that field. Raises `formats.BadRecord` naming the field."""
  for field in OUTPUT_FIELDS:
    if field in record:
      raise formats.BadRecord(location, field, "the record already has this output field; annotating it would "
                                               "overwrite it (rename the field first)")
  fields = samples.Fields(spec.question_field, spec.answer_field, spec.options_field)
  return samples.sample(location, record, spec.record_format, fields)
