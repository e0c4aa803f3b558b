"""The seqio data sources of `tasks`, through the registered tasks and mixtures: caps, mixing rates, interleaving,
determinism, host sharding, the bad-record policy and missing data."""

import json
import pathlib
import re

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

import tasks
from tasks import config, formats, sources
from teacherlm_jax import feature_converters
from conftest import tf_example

BIG, SMALL = 5000, 40
BIG_PROMPT, SMALL_PROMPT = "b_big_prompt", "a_small_prompt"  # the small one sorts first
BIG_FILE = "train.tfrecord-00000-of-00001"
EMBEDDED_TEACHERDATA = config.EMBEDDED_DATA / "teacherdata" / "train.jsonl"


def _write_tfrecord(path: pathlib.Path, examples) -> None:
  with tf.io.TFRecordWriter(str(path)) as writer:
    for example in examples:
      writer.write(example)


def _write_jsonl(path: pathlib.Path, records) -> None:
  path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


@pytest.fixture(scope="module")
def p3_root(tmp_path_factory) -> pathlib.Path:
  """P3 layout: a 5,000-example TFRecord prompt and a 40-example JSONL prompt (plus validation files)."""
  root = tmp_path_factory.mktemp("p3")
  (root / BIG_PROMPT).mkdir()
  _write_tfrecord(root / BIG_PROMPT / BIG_FILE, (
      tf_example(inputs_pretokenized=f"big question {i}", targets_pretokenized=f"big answer {i}", idx=i)
      for i in range(BIG)))
  _write_tfrecord(root / BIG_PROMPT / "validation.tfrecord-00000-of-00001", (
      tf_example(inputs_pretokenized=f"big validation {i}", targets_pretokenized="v", idx=i) for i in range(7)))
  (root / SMALL_PROMPT).mkdir()
  _write_jsonl(root / SMALL_PROMPT / "train.jsonl",
               [{"inputs": f"small question {i}", "targets": f"small answer {i}"} for i in range(SMALL)])
  (root / "README.md").write_text("metadata next to the prompt directories is listed, not read")
  return root


@pytest.fixture(scope="module")
def muffin_root(tmp_path_factory) -> pathlib.Path:
  """Muffin layout: a 25-example JSONL task and a 15-example TFRecord task (`inputs` / `targets`)."""
  root = tmp_path_factory.mktemp("muffin")
  (root / "jsonl_task").mkdir()
  _write_jsonl(root / "jsonl_task" / "train.jsonl",
               [{"inputs": f"muffin jsonl {i}", "targets": f"t{i}"} for i in range(25)])
  (root / "tfrecord_task").mkdir()
  _write_tfrecord(root / "tfrecord_task" / BIG_FILE,
                  (tf_example(inputs=f"muffin tfrecord {i}", targets=f"t{i}") for i in range(15)))
  return root


pytestmark = pytest.mark.usefixtures("clean_task_config")


def _examples(task_name: str, split: str = "train", shard_info=None) -> list[dict]:
  task = seqio.get_mixture_or_task(task_name)
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1, shard_info=shard_info)
  return list(dataset.as_numpy_iterator())


def _ids(examples) -> list[str]:
  return [example["example_id"].decode() for example in examples]


def _split_p3(examples) -> tuple[list[int], list[int]]:
  """The big and the small prompt's example numbers (from the text), in stream order; checks ids match texts."""
  big, small = [], []
  for example in examples:
    text = example["inputs_pretokenized"].decode()
    kind, number = re.fullmatch(r"(big|small) question (\d+)", text).groups()
    line = int(number) + 1
    prompt, name = (BIG_PROMPT, BIG_FILE) if kind == "big" else (SMALL_PROMPT, "train.jsonl")
    assert example["example_id"].decode() == f"{prompt}/{name}:{line}"
    (big if kind == "big" else small).append(int(number))
  return big, small


# ------------------------------------------------------------------------------------------------------------ caps


def test_default_caps():
  assert config.caps("p3_sense_3k") == 3000
  assert config.caps("muffin_3w") == 30000
  assert config.caps("teacherdata_2m") is None


def test_p3_cap_keeps_the_first_3000_of_each_prompt_once(p3_root):
  gin.bind_parameter("data_root.p3_sense_3k", str(p3_root))
  task = tasks.get_mixture_or_task("teacherlm_p3_sense_3k")
  assert task.num_input_examples("train") == 3000 + SMALL
  sizes = task.source.group_sizes("train")
  assert {name.split("/")[-1]: size for name, size in sizes.items()} == {BIG_PROMPT: 3000, SMALL_PROMPT: SMALL}

  examples = _examples("teacherlm_p3_sense_3k")
  assert len(examples) == 3000 + SMALL
  big, small = _split_p3(examples)
  assert big == list(range(3000))  # the first 3,000 in file order, in that order, each once
  assert sorted(small) == list(range(SMALL)) and small == sorted(small)
  assert examples[0]["targets_pretokenized"].decode() in (" big answer 0", " small answer 0")

  # groups are interleaved at their capped proportions, not concatenated (either order would give 0 or 40)
  from_small = sum(example["inputs_pretokenized"].startswith(b"small") for example in examples[:1000])
  assert 3 <= from_small <= 30, from_small  # expected 1000 * 40 / 3040 = 13.2

  assert len(_examples("teacherlm_p3_sense_3k", "validation")) == 7


def test_p3_cap_is_gin_configurable(p3_root):
  gin.bind_parameter("data_root.p3_sense_3k", str(p3_root))
  gin.bind_parameter("caps.p3_sense_3k", 100)
  task = seqio.get_mixture_or_task("teacherlm_p3_sense_3k")
  assert task.num_input_examples("train") == 100 + SMALL
  big, small = _split_p3(_examples("teacherlm_p3_sense_3k"))
  assert big == list(range(100)) and sorted(small) == list(range(SMALL))


def test_muffin_cap(muffin_root):
  gin.bind_parameter("data_root.muffin_3w", str(muffin_root))
  task = seqio.get_mixture_or_task("teacherlm_muffin_3w")
  assert task.num_input_examples("train") == 40  # 25 + 15, far below 30,000
  assert sorted(_ids(_examples("teacherlm_muffin_3w"))) == sorted(
      [f"jsonl_task/train.jsonl:{line}" for line in range(1, 26)]
      + [f"tfrecord_task/{BIG_FILE}:{number}" for number in range(1, 16)])

  sources.clear_scan_cache()
  gin.bind_parameter("caps.muffin_3w", 10)
  assert config.caps("muffin_3w") == 10
  assert task.num_input_examples("train") == 20
  examples = _examples("teacherlm_muffin_3w")
  assert sorted(_ids(examples)) == sorted(
      [f"jsonl_task/train.jsonl:{line}" for line in range(1, 11)]
      + [f"tfrecord_task/{BIG_FILE}:{number}" for number in range(1, 11)])
  texts = sorted(example["inputs_pretokenized"].decode() for example in examples)
  assert texts == sorted([f"muffin jsonl {i}" for i in range(10)] + [f"muffin tfrecord {i}" for i in range(10)])


# --------------------------------------------------------------------------------------------------- mixing rates


def test_stage1_rates_are_the_capped_counts(p3_root, muffin_root):
  gin.bind_parameter("data_root.p3_sense_3k", str(p3_root))
  gin.bind_parameter("data_root.muffin_3w", str(muffin_root))
  mixture = seqio.get_mixture_or_task("teacherlm_stage1_multitask")
  rates = {task.name: mixture.get_rate(task) for task in mixture.tasks}
  assert rates == {"teacherlm_p3_sense_3k": 3000.0 + SMALL, "teacherlm_muffin_3w": 40.0}

  gin.bind_parameter("caps.p3_sense_3k", 100)
  gin.bind_parameter("caps.muffin_3w", 10)
  rates = {task.name: mixture.get_rate(task) for task in mixture.tasks}
  assert rates == {"teacherlm_p3_sense_3k": 100.0 + SMALL, "teacherlm_muffin_3w": 20.0}

  # the mixture samples at those rates: Muffin is 20 / 160 = 12.5% of the stream
  dataset = mixture.get_dataset(sequence_length=None, split="train", shuffle=False, seed=3, num_epochs=None,
                                passthrough_features=["example_id"])
  ids = _ids(dataset.take(1600).as_numpy_iterator())
  from_muffin = sum(id_.startswith(("jsonl_task/", "tfrecord_task/")) for id_ in ids) / len(ids)
  assert 0.09 <= from_muffin <= 0.16, from_muffin


def test_mixing_rate_maximum_temperature_and_weights(p3_root, muffin_root):
  gin.bind_parameter("data_root.p3_sense_3k", str(p3_root))
  gin.bind_parameter("data_root.muffin_3w", str(muffin_root))
  mixture = seqio.get_mixture_or_task("teacherlm_stage1_multitask")
  gin.bind_parameter("examples_rate.maximum", 1000)
  gin.bind_parameter("examples_rate.temperature", 2.0)
  gin.bind_parameter("examples_rate.weights", {"teacherlm_muffin_3w": 3.0})
  rates = {task.name: mixture.get_rate(task) for task in mixture.tasks}
  assert rates == pytest.approx({"teacherlm_p3_sense_3k": 1000 ** 0.5, "teacherlm_muffin_3w": 3.0 * 40 ** 0.5})
  gin.bind_parameter("examples_rate.temperature", 0.0)
  with pytest.raises(ValueError, match="temperature 0.0 must be > 0"):
    mixture.get_rate(mixture.tasks[0])


# ---------------------------------------------------------------------------------------------------- determinism


def _first_batches(name: str, seed: int, count: int = 3) -> list[dict]:
  dataset = seqio.get_dataset(name, task_feature_lengths={"inputs": 64, "targets": 64}, dataset_split="train",
                              shuffle=True, seed=seed, num_epochs=1, batch_size=4,
                              feature_converter=feature_converters.CausalLMFeatureConverter(pack=True))
  return list(dataset.take(count).as_numpy_iterator())


@pytest.mark.parametrize("name", ["teacherlm_stage1_multitask", "teacherlm_teacherdata_2m"])
def test_same_seed_same_batches_other_seed_other_batches(name):
  first, again, other = _first_batches(name, 7), _first_batches(name, 7), _first_batches(name, 8)
  assert len(first) == 3 and first[0]["decoder_target_tokens"].shape == (4, 128)
  assert set(first[0]) >= {"decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
                           "decoder_segment_ids", "decoder_positions"}
  for batch, same in zip(first, again):
    assert batch.keys() == same.keys()
    for key in batch:
      np.testing.assert_array_equal(batch[key], same[key])
  assert any(not np.array_equal(batch["decoder_target_tokens"], changed["decoder_target_tokens"])
             for batch, changed in zip(first, other))


# -------------------------------------------------------------------------------------------------- host sharding


def _check_shards(task_name: str, expected: int) -> list[list[str]]:
  everything = _ids(_examples(task_name))
  assert len(everything) == len(set(everything)) == expected
  shards = [_ids(_examples(task_name, shard_info=seqio.ShardInfo(index=i, num_shards=2))) for i in range(2)]
  assert all(len(shard) == len(set(shard)) for shard in shards)
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == set(everything)
  return shards


def _files(ids: list[str]) -> set[str]:
  return {example_id.rsplit(":", 1)[0] for example_id in ids}


def test_host_sharding_embedded_teacherdata():
  """One file, two hosts: record-level sharding, balanced."""
  shards = _check_shards("teacherlm_teacherdata_2m", expected=sum(1 for _ in EMBEDDED_TEACHERDATA.open()))
  assert abs(len(shards[0]) - len(shards[1])) <= 1


def test_host_sharding_p3_groups(p3_root):
  """Two prompt files, two hosts: each host reads whole files of its own (file-level sharding), capped."""
  gin.bind_parameter("data_root.p3_sense_3k", str(p3_root))
  shards = _check_shards("teacherlm_p3_sense_3k", expected=3000 + SMALL)
  assert _files(shards[0]) == {f"{SMALL_PROMPT}/train.jsonl"} and _files(shards[1]) == {f"{BIG_PROMPT}/{BIG_FILE}"}
  assert sorted(len(shard) for shard in shards) == [SMALL, 3000]


# ---------------------------------------------------------------------------------------------------- bad records


GOOD_LINES = EMBEDDED_TEACHERDATA.read_bytes().splitlines()[:6]


def _good(index: int) -> dict:
  return json.loads(GOOD_LINES[index])


def _with(index: int, **changes) -> bytes:
  record = {**_good(index), **changes}
  return json.dumps({key: value for key, value in record.items() if value is not _DROP}).encode()


_DROP = object()
# (bad line, field, reason) for each kind of bad record
BAD_CASES = {
    "invalid_json": (b'{"id": "broken", "question": "unterminated', None, "invalid JSON"),
    "missing_field": (_with(3, fundamentals=_DROP), "fundamentals", "missing"),
    "empty_question": (_with(3, question=""), "question", "empty"),
    "wrong_type": (_with(3, answer=3), "answer", "expected a string, got int 3"),
    "not_utf8": (b'{"id": "x", "question": "caf\xe9"}', None, "not valid UTF-8"),
}


def _teacherdata_root(tmp_path: pathlib.Path, lines: list[bytes]) -> pathlib.Path:
  root = tmp_path / "teacherdata"
  root.mkdir()
  (root / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  return root


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_raises_by_default(tmp_path, case):
  bad_line, field, reason = BAD_CASES[case]
  root = _teacherdata_root(tmp_path, GOOD_LINES[:3] + [bad_line] + GOOD_LINES[3:])
  gin.bind_parameter("data_root.teacherdata_2m", str(root))
  task = seqio.get_mixture_or_task("teacherlm_teacherdata_2m")
  where = f"{root / 'train.jsonl'} line 4"
  expected = re.escape(f"{where}, field {field!r}: {reason}" if field else f"{where}: {reason}")
  with pytest.raises(formats.BadRecord, match=expected) as caught:
    task.get_dataset(sequence_length=None, split="train", shuffle=False)
  assert caught.value.location.line == 4 and caught.value.field == field
  with pytest.raises(formats.BadRecord, match=expected):
    task.num_input_examples("train")


def test_bad_records_skipped_are_counted_and_written(tmp_path):
  order = sorted(BAD_CASES)
  lines = [GOOD_LINES[0], BAD_CASES[order[0]][0], GOOD_LINES[1], b"", BAD_CASES[order[1]][0], GOOD_LINES[2],
           BAD_CASES[order[2]][0], BAD_CASES[order[3]][0], GOOD_LINES[3], GOOD_LINES[4], BAD_CASES[order[4]][0],
           GOOD_LINES[5]]
  root = _teacherdata_root(tmp_path, lines)
  rejects_dir = tmp_path / "rejects"
  gin.bind_parameter("data_root.teacherdata_2m", str(root))
  gin.bind_parameter("bad_record_policy.on_bad_record", "skip")
  gin.bind_parameter("bad_record_policy.rejects_dir", str(rejects_dir))
  task = seqio.get_mixture_or_task("teacherlm_teacherdata_2m")

  assert task.num_input_examples("train") == 6
  ids = _ids(_examples("teacherlm_teacherdata_2m"))
  assert ids == [_good(i)["id"] for i in range(6)]

  assert [path.name for path in rejects_dir.iterdir()] == ["teacherdata_train.rejects.jsonl"]
  rejects = [json.loads(line) for line in (rejects_dir / "teacherdata_train.rejects.jsonl").read_text().splitlines()]
  path = str(root / "train.jsonl")
  assert [(reject["file"], reject["line"], reject["field"]) for reject in rejects] == [
      (path, 2, BAD_CASES[order[0]][1]), (path, 5, BAD_CASES[order[1]][1]), (path, 7, BAD_CASES[order[2]][1]),
      (path, 8, BAD_CASES[order[3]][1]), (path, 11, BAD_CASES[order[4]][1])]
  assert all(reject["reason"].startswith(BAD_CASES[case][2]) for reject, case in zip(rejects, order))
  assert len(ids) + len(rejects) == sum(1 for line in lines if line.strip())  # nothing dropped silently


def test_bad_record_policy_is_validated():
  gin.bind_parameter("bad_record_policy.on_bad_record", "ignore")
  with pytest.raises(ValueError, match="on_bad_record='ignore'"):
    config.bad_record_policy()


# --------------------------------------------------------------------------------------------------- missing data


def test_root_without_files_for_the_split(tmp_path, p3_root):
  empty = tmp_path / "empty"
  empty.mkdir()
  gin.bind_parameter("data_root.teacherdata_2m", str(empty))
  task = seqio.get_mixture_or_task("teacherlm_teacherdata_2m")
  with pytest.raises(FileNotFoundError, match=f"teacherdata_2m: no 'train' files under {re.escape(str(empty))}"):
    task.get_dataset(sequence_length=None, split="train", shuffle=False)
  with pytest.raises(FileNotFoundError, match="teacherdata_2m"):
    task.num_input_examples("train")

  # a P3 root whose prompt directories hold no validation files (only the big prompt has them)
  gin.bind_parameter("data_root.p3_sense_3k", str(empty))
  with pytest.raises(FileNotFoundError, match=f"p3_sense_3k: no 'train' files under {re.escape(str(empty))}"):
    seqio.get_mixture_or_task("teacherlm_p3_sense_3k").num_input_examples("train")
  (empty / "prompt").mkdir()
  (empty / "prompt" / "validation.jsonl").write_text('{"inputs": "a", "targets": "b"}\n')
  with pytest.raises(FileNotFoundError, match="p3_sense_3k: no 'train' files"):
    seqio.get_mixture_or_task("teacherlm_p3_sense_3k").num_input_examples("train")
  assert seqio.get_mixture_or_task("teacherlm_p3_sense_3k").num_input_examples("validation") == 1


@pytest.mark.parametrize("corpus, task_name", [("p3_sense_3k", "teacherlm_p3_sense_3k"),
                                               ("teacherdata_2m", "teacherlm_teacherdata_2m")])
def test_root_that_does_not_exist(tmp_path, corpus, task_name):
  missing = tmp_path / "no_such_dir"
  gin.bind_parameter(f"data_root.{corpus}", str(missing))
  with pytest.raises(FileNotFoundError, match=f"{corpus}: no 'train' files under {re.escape(str(missing))}"):
    seqio.get_mixture_or_task(task_name).get_dataset(sequence_length=None, split="train", shuffle=False)


def test_unknown_split():
  task = seqio.get_mixture_or_task("teacherlm_teacherdata_2m")
  with pytest.raises(ValueError, match=r"teacherdata_2m: no split 'test'; splits are \['train', 'validation'\]"):
    task.get_dataset(sequence_length=None, split="test", shuffle=False)
  with pytest.raises(ValueError, match="no split 'test'"):
    task.num_input_examples("test")


def test_a_corrupted_tfrecord_stops_with_its_record_or_is_a_counted_reject(tmp_path):
  root = tmp_path / "teacherdata"
  root.mkdir()
  path = root / "train.tfrecord-00000-of-00001"
  _write_tfrecord(path, (tf_example(**_good(i % 6)) for i in range(10)))
  corrupted = bytearray(path.read_bytes())
  corrupted[len(corrupted) // 2] ^= 0xFF
  path.write_bytes(bytes(corrupted))
  gin.bind_parameter("data_root.teacherdata_2m", str(root))
  task = seqio.get_mixture_or_task("teacherlm_teacherdata_2m")
  with pytest.raises(formats.BadRecord, match=rf"{path} record \d+: corrupted TFRecord .* the rest of the file is "
                                              "unreadable"):
    task.num_input_examples("train")
  gin.bind_parameter("bad_record_policy.on_bad_record", "skip")
  gin.bind_parameter("bad_record_policy.rejects_dir", str(tmp_path / "rejects"))
  sources.clear_scan_cache()
  count = task.num_input_examples("train")
  assert 0 < count < 10 and len(_examples("teacherlm_teacherdata_2m")) == count
  reject = json.loads((tmp_path / "rejects" / "teacherdata_train.rejects.jsonl").read_text())
  assert reject["record"] == count + 1 and reject["reason"].startswith("corrupted TFRecord")
