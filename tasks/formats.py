"""Readers for the corpora's real on-disk formats, with record validation that names file, line and field.

Formats: JSONL (one object per line), TFRecord of `tf.train.Example` (P3's `inputs_pretokenized` /
`targets_pretokenized`, Muffin's `inputs` / `targets`, TeacherData's fields), and the Hendrycks MMLU CSV
(no header: question, A, B, C, D, answer). Files are read through `tf.io.gfile`, so `gs://` paths work.

Each reader yields `(Location, record)` where a record that cannot be read is a `BadRecord` instead of a dict; what
happens to it (raise, or count and write to a rejects file) is the caller's policy (`tasks.sources`). Blank lines in
JSONL are not records and are passed over.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from typing import Any, Iterator, Mapping, Union

import tensorflow as tf

Record = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Location:
  """Where a record is: a 1-based line (JSONL, CSV) or record number (TFRecord) in a file."""

  path: str
  line: int
  unit: str = "line"

  def __str__(self) -> str:
    return f"{self.path} {self.unit} {self.line}"


class BadRecord(ValueError):
  """A record that cannot be used; the message names the file, the line/record and the field."""

  def __init__(self, location: Location, field: str | None, reason: str):
    self.location, self.field, self.reason = location, field, reason
    where = f"{location}" if field is None else f"{location}, field {field!r}"
    super().__init__(f"{where}: {reason}")

  def as_json(self) -> dict:
    return {"file": self.location.path, self.location.unit: self.location.line, "field": self.field,
            "reason": self.reason}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "BadRecord":
    """The inverse of `as_json`."""
    unit = next(name for name in ("line", "record", "row") if name in data)
    return cls(Location(data["file"], int(data[unit]), unit), data["field"], data["reason"])


Item = tuple[Location, Union[Record, BadRecord]]


def iter_jsonl(path: str) -> Iterator[Item]:
  """Objects of a JSONL file; invalid UTF-8, invalid JSON and non-objects become `BadRecord`s."""
  with tf.io.gfile.GFile(path, "rb") as handle:
    for number, raw in enumerate(handle, start=1):
      location = Location(path, number)
      try:
        record = decode_jsonl_line(location, raw)
      except BadRecord as error:
        yield location, error
        continue
      if record is not None:
        yield location, record


def decode_jsonl_line(location: Location, raw: bytes) -> Record | None:
  """The object on one JSONL line (None for a blank line); raises `BadRecord` for bad UTF-8, JSON or a non-object."""
  if not raw.strip():
    return None
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as error:
    raise BadRecord(location, None, f"not valid UTF-8 ({error.reason} at byte {error.start})") from None
  try:
    record = json.loads(text)
  except json.JSONDecodeError as error:
    raise BadRecord(location, None, f"invalid JSON ({error.msg} at column {error.colno})") from None
  if not isinstance(record, dict):
    raise BadRecord(location, None, f"expected a JSON object, got {type(record).__name__}")
  return record


def iter_tfrecord(path: str) -> Iterator[Item]:
  """`tf.train.Example`s of a TFRecord file as dicts: bytes features decode to str (UTF-8), ints and floats stay."""
  dataset = tf.data.TFRecordDataset(path).as_numpy_iterator()
  number = 0
  while True:
    number += 1
    location = Location(path, number, unit="record")
    try:
      raw = next(dataset)
    except StopIteration:
      return
    except tf.errors.DataLossError as error:
      yield location, BadRecord(location, None, f"corrupted TFRecord ({error.message}); the rest of the file is "
                                                "unreadable")
      return
    yield location, example_to_record(location, raw)


def example_to_record(location: Location, raw: bytes) -> Union[Record, BadRecord]:
  try:
    example = tf.train.Example.FromString(raw)
  except Exception as error:  # protobuf's DecodeError
    return BadRecord(location, None, f"not a tf.train.Example ({error})")
  record: Record = {}
  for name, feature in example.features.feature.items():
    kind = feature.WhichOneof("kind")
    values = list(getattr(feature, kind).value) if kind else []
    if kind == "bytes_list":
      try:
        values = [value.decode("utf-8") for value in values]
      except UnicodeDecodeError as error:
        return BadRecord(location, name, f"not valid UTF-8 ({error.reason} at byte {error.start})")
    record[name] = values[0] if len(values) == 1 else values
  return record


def iter_csv(path: str, columns: tuple[str, ...]) -> Iterator[Item]:
  """Rows of a header-less CSV as dicts keyed by `columns`, located at the line where each row starts. A row with
  another column count or with bytes that are not UTF-8 is a `BadRecord`; the rows after it are still read."""
  with tf.io.gfile.GFile(path, "rb") as handle:
    text = handle.read().decode("utf-8", errors="surrogateescape")  # bad bytes never split a CSV row
  reader = csv.reader(io.StringIO(text, newline=""))
  end = 0
  for row in reader:
    location, end = Location(path, end + 1), reader.line_num
    if not any(cell.strip() for cell in row):
      continue
    if len(row) != len(columns):
      yield location, BadRecord(location, None, f"expected {len(columns)} columns {columns}, got {len(row)}")
      continue
    record = dict(zip(columns, row))
    yield location, _undecodable(location, record) or record


def _undecodable(location: Location, record: Record) -> BadRecord | None:
  """A `BadRecord` for the first field holding bytes that were not UTF-8 (surrogate-escaped), else None."""
  for field, value in record.items():
    try:
      value.encode("utf-8", errors="surrogateescape").decode("utf-8")
    except UnicodeDecodeError as error:
      return BadRecord(location, field, f"not valid UTF-8 ({error.reason} at byte {error.start})")
  return None


def check_fields(location: Location, record: Record, required: Mapping[str, type],
                 optional: Mapping[str, type] = {}) -> Record:  # noqa: B006 (read-only default)
  """Checks presence, type and non-emptiness of fields; raises `BadRecord` naming the first bad field."""
  for field, kind in {**required, **optional}.items():
    if field not in record or record[field] is None:
      if field in required:
        raise BadRecord(location, field, "missing")
      continue
    value = record[field]
    if kind is str and not isinstance(value, str):
      raise BadRecord(location, field, f"expected a string, got {type(value).__name__} {value!r:.40}")
    if kind is str and not value.strip():
      raise BadRecord(location, field, "empty")
    if kind is bool and not isinstance(value, bool):
      raise BadRecord(location, field, f"expected true/false, got {type(value).__name__} {value!r:.40}")
    if kind is list and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
      raise BadRecord(location, field, f"expected a list of strings, got {value!r:.60}")
    if kind is list and not value:
      raise BadRecord(location, field, "empty")
  return record
