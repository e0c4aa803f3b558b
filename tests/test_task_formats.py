"""The on-disk readers of `tasks.formats` (JSONL, TFRecord, Hendrycks CSV) and record validation."""

import pathlib

import pytest
import tensorflow as tf

from tasks import formats
from tasks.formats import BadRecord, Location
from conftest import tf_example

MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")


def _records(items):
  """Splits reader output into (line, record) and (line, BadRecord) lists."""
  good = [(location.line, record) for location, record in items if not isinstance(record, BadRecord)]
  bad = [(location.line, record) for location, record in items if isinstance(record, BadRecord)]
  return good, bad


def _write_tfrecord(path: pathlib.Path, examples) -> pathlib.Path:
  with tf.io.TFRecordWriter(str(path)) as writer:
    for example in examples:
      writer.write(example)
  return path


# ----------------------------------------------------------------------------------------------------------- JSONL


def test_jsonl_valid_objects_in_order(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text('{"a": "x", "n": 1}\n{"a": "caf\u00e9 \u2019", "n": 2}\n', encoding="utf-8")
  items = list(formats.iter_jsonl(str(path)))
  assert [(location.path, location.line, location.unit) for location, _ in items] == [
      (str(path), 1, "line"), (str(path), 2, "line")]
  assert [record for _, record in items] == [{"a": "x", "n": 1}, {"a": "caf\u00e9 \u2019", "n": 2}]


def test_jsonl_invalid_json_names_file_and_physical_line(tmp_path):
  path = tmp_path / "data.jsonl"
  # line 1 good, 2 blank, 3 whitespace only, 4 invalid, 5 good
  path.write_bytes(b'{"a": 1}\n\n   \n{"a": \n{"a": 5}\n')
  good, bad = _records(list(formats.iter_jsonl(str(path))))
  assert good == [(1, {"a": 1}), (5, {"a": 5})]
  assert len(bad) == 1 and bad[0][0] == 4
  error = bad[0][1]
  assert error.location == Location(str(path), 4) and error.field is None
  assert str(error).startswith(f"{path} line 4: invalid JSON")
  assert error.as_json() == {"file": str(path), "line": 4, "field": None, "reason": error.reason}


def test_jsonl_non_utf8_line(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_bytes(b'{"a": "ok"}\n{"a": "\xff\xfe bad"}\n{"a": "also ok"}\n')
  good, bad = _records(list(formats.iter_jsonl(str(path))))
  assert good == [(1, {"a": "ok"}), (3, {"a": "also ok"})]
  assert [line for line, _ in bad] == [2]
  assert "not valid UTF-8" in str(bad[0][1]) and f"{path} line 2" in str(bad[0][1])


@pytest.mark.parametrize("line, kind", [(b"[1, 2]", "list"), (b'"text"', "str"), (b"3", "int"), (b"null", "NoneType")],
                         ids=["array", "string", "number", "null"])
def test_jsonl_non_object_is_bad(tmp_path, line, kind):
  path = tmp_path / "data.jsonl"
  path.write_bytes(b'{"a": 1}\n' + line + b"\n")
  good, bad = _records(list(formats.iter_jsonl(str(path))))
  assert good == [(1, {"a": 1})]
  assert [line for line, _ in bad] == [2]
  assert f"expected a JSON object, got {kind}" in str(bad[0][1])


def test_jsonl_last_line_without_newline_and_crlf(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_bytes(b'{"a": 1}\r\n\r\n{"a": 3}')
  good, bad = _records(list(formats.iter_jsonl(str(path))))
  assert good == [(1, {"a": 1}), (3, {"a": 3})] and bad == []


# -------------------------------------------------------------------------------------------------------- TFRecord


def test_tfrecord_bytes_and_int_features(tmp_path):
  path = _write_tfrecord(tmp_path / "train.tfrecord-00000-of-00001", [
      tf_example(inputs_pretokenized="Is it true? caf\u00e9", targets_pretokenized="true", idx=0),
      tf_example(inputs_pretokenized="second", targets_pretokenized="false", idx=1)])
  items = list(formats.iter_tfrecord(str(path)))
  assert [(location.line, location.unit) for location, _ in items] == [(1, "record"), (2, "record")]
  assert [record for _, record in items] == [
      {"inputs_pretokenized": "Is it true? caf\u00e9", "targets_pretokenized": "true", "idx": 0},
      {"inputs_pretokenized": "second", "targets_pretokenized": "false", "idx": 1}]
  assert isinstance(items[0][1]["idx"], int) and isinstance(items[0][1]["inputs_pretokenized"], str)


def test_tfrecord_invalid_utf8_names_the_field(tmp_path):
  path = _write_tfrecord(tmp_path / "train.tfrecord", [
      tf_example(inputs="fine", targets="fine"), tf_example(inputs="fine", targets=b"bad \xff\xfe"),
      tf_example(inputs="after", targets="ok")])
  good, bad = _records(list(formats.iter_tfrecord(str(path))))
  assert good == [(1, {"inputs": "fine", "targets": "fine"}), (3, {"inputs": "after", "targets": "ok"})]
  assert [line for line, _ in bad] == [2]
  error = bad[0][1]
  assert error.field == "targets" and "not valid UTF-8" in error.reason
  assert str(error).startswith(f"{path} record 2, field 'targets'")


def test_tfrecord_truncated_file(tmp_path):
  full = _write_tfrecord(tmp_path / "full.tfrecord", [tf_example(inputs=f"q{i}", targets=f"a{i}") for i in range(5)])
  data = full.read_bytes()
  truncated = tmp_path / "truncated.tfrecord"
  truncated.write_bytes(data[:-5])  # cuts into the 5th record's payload/CRC
  good, bad = _records(list(formats.iter_tfrecord(str(truncated))))
  assert [record["inputs"] for _, record in good] == ["q0", "q1", "q2", "q3"]
  assert [line for line, _ in bad] == [5]
  assert f"{truncated} record 5" in str(bad[0][1]) and "corrupted TFRecord" in str(bad[0][1])


def test_tfrecord_corrupted_record_stops_the_file(tmp_path):
  examples = [tf_example(inputs=f"q{i}", targets=f"a{i}") for i in range(5)]
  full = _write_tfrecord(tmp_path / "full.tfrecord", examples)
  data = bytearray(full.read_bytes())
  record_size = len(data) // 5  # equal-size records: 12-byte header + payload + 4-byte CRC
  data[2 * record_size + 14] ^= 0xFF  # a payload byte of record 3: its CRC no longer matches
  corrupted = tmp_path / "corrupted.tfrecord"
  corrupted.write_bytes(bytes(data))
  items = list(formats.iter_tfrecord(str(corrupted)))
  good, bad = _records(items)
  assert [record["inputs"] for _, record in good] == ["q0", "q1"]
  assert [line for line, _ in bad] == [3] and len(items) == 3
  assert "corrupted TFRecord" in bad[0][1].reason and "record 3" in str(bad[0][1])


def test_tfrecord_not_antf_example(tmp_path):
  path = _write_tfrecord(tmp_path / "x.tfrecord", [tf_example(inputs="ok"), b"\xff\xff\xff not a proto"])
  good, bad = _records(list(formats.iter_tfrecord(str(path))))
  assert good == [(1, {"inputs": "ok"})]
  assert [line for line, _ in bad] == [2] and "not a tf.train.Example" in bad[0][1].reason


# ------------------------------------------------------------------------------------------------------------- CSV


def test_csv_hendrycks_layout_with_quoting(tmp_path):
  path = tmp_path / "world_religions_dev.csv"
  path.write_bytes(
      b'Plain question?,one,two,three,four,A\n'
      b'"Which, with a comma, is ""quoted""?",x,"y, z","multi\nline option",w,C\n'
      b'"A question\nover two lines",a,b,c,d,D\n'
      b'\n'
      b'Last,1,2,3,4,B\n')
  items = list(formats.iter_csv(str(path), MMLU_COLUMNS))
  good, bad = _records(items)
  assert bad == []
  # each row is located at the line where it starts
  assert [line for line, _ in good] == [1, 2, 4, 7]
  assert good[0][1] == dict(zip(MMLU_COLUMNS, ["Plain question?", "one", "two", "three", "four", "A"]))
  assert good[1][1] == dict(zip(MMLU_COLUMNS, ['Which, with a comma, is "quoted"?', "x", "y, z",
                                               "multi\nline option", "w", "C"]))
  assert good[2][1]["question"] == "A question\nover two lines" and good[2][1]["answer"] == "D"
  assert good[3][1]["answer"] == "B"


def test_csv_wrong_column_count(tmp_path):
  path = tmp_path / "x_test.csv"
  path.write_bytes(b'q1,a,b,c,d,A\n"q2\nsecond line",a,b,c,d,B,extra\nq3,a,b,c\nq4,a,b,c,d,D\n')
  good, bad = _records(list(formats.iter_csv(str(path), MMLU_COLUMNS)))
  assert [(line, record["question"]) for line, record in good] == [(1, "q1"), (5, "q4")]
  assert [line for line, _ in bad] == [2, 4]
  assert str(bad[0][1]).startswith(f"{path} line 2: expected 6 columns")
  assert bad[0][1].reason.endswith("got 7") and bad[1][1].reason.endswith("got 4")


def test_csv_non_utf8_row_is_bad_and_the_rest_is_read(tmp_path):
  path = tmp_path / "x_val.csv"
  path.write_bytes(b'q1,a,b,c,d,A\n"q2\n2nd",a,b,\xe9t\xe9,d,B\nq3,a,b,c,d,C\n')
  good, bad = _records(list(formats.iter_csv(str(path), MMLU_COLUMNS)))
  assert [(line, record["question"]) for line, record in good] == [(1, "q1"), (4, "q3")]
  assert [line for line, _ in bad] == [2]
  error = bad[0][1]
  assert error.field == "C" and "not valid UTF-8" in error.reason
  assert str(error).startswith(f"{path} line 2, field 'C'")


# ---------------------------------------------------------------------------------------------------- check_fields


REQUIRED = {"question": str, "answer": bool, "facts": list}
GOOD = {"question": "Is it?", "answer": True, "facts": ["a", "b"]}
WHERE = Location("some/file.jsonl", 7)


def test_check_fields_accepts_a_good_record():
  assert formats.check_fields(WHERE, dict(GOOD), REQUIRED) == GOOD
  assert formats.check_fields(WHERE, dict(GOOD), REQUIRED, {"subject": str, "extra": list}) == GOOD
  assert formats.check_fields(WHERE, {**GOOD, "subject": None}, REQUIRED, {"subject": str})["subject"] is None


@pytest.mark.parametrize("field, value, reason", [
    ("question", None, "missing"),
    ("question", "", "empty"),
    ("question", " \n\t ", "empty"),
    ("question", 3, "expected a string, got int 3"),
    ("question", ["Is it?"], "expected a string, got list"),
    ("answer", "true", "expected true/false, got str 'true'"),
    ("answer", 1, "expected true/false, got int 1"),
    ("facts", ["a", 2], "expected a list of strings"),
    ("facts", "a", "expected a list of strings"),
    ("facts", [], "empty"),
], ids=["none", "empty", "whitespace", "int_for_str", "list_for_str", "string_true_for_bool", "int_for_bool",
        "list_of_non_strings", "str_for_list", "empty_list"])
def test_check_fields_bad_value(field, value, reason):
  record = {**GOOD, field: value}
  with pytest.raises(BadRecord) as caught:
    formats.check_fields(WHERE, record, REQUIRED)
  assert caught.value.field == field and caught.value.location == WHERE
  assert caught.value.reason.startswith(reason)
  assert str(caught.value).startswith(f"some/file.jsonl line 7, field {field!r}: {reason}")


@pytest.mark.parametrize("field", ["question", "answer", "facts"])
def test_check_fields_missing_required(field):
  record = {name: value for name, value in GOOD.items() if name != field}
  with pytest.raises(BadRecord, match=rf"line 7, field '{field}': missing"):
    formats.check_fields(WHERE, record, REQUIRED)


def test_check_fields_optional_present_is_still_checked():
  with pytest.raises(BadRecord, match="field 'subject': expected a string"):
    formats.check_fields(WHERE, {**GOOD, "subject": 5}, REQUIRED, {"subject": str})
  with pytest.raises(BadRecord, match="field 'subject': empty"):
    formats.check_fields(WHERE, {**GOOD, "subject": "  "}, REQUIRED, {"subject": str})


def test_check_fields_names_the_first_bad_field_in_order():
  with pytest.raises(BadRecord) as caught:
    formats.check_fields(WHERE, {"answer": "no", "facts": 3}, REQUIRED)
  assert caught.value.field == "question"
