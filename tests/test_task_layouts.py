"""The corpora in their published layouts (tests/fixtures/corpora, made by make_corpus_fixtures.py), registered by
gin alone: P3 Parquet and TFRecord with a score_eval twin, Flan 2021 as a table and as per-task files, TeacherData
with other field names and the annotation loop's output; caps, subsamples, selection globs, unread entries."""

import json
import pathlib
import shutil

import gin
import pytest
import seqio

import tasks  # noqa: F401  (registers the tasks)
from tasks import layouts, sources
from teacherlm_jax import data_sources

CORPORA = pathlib.Path(__file__).parent / "fixtures" / "corpora"
P3_PROMPTS = {"creak_claim_true_or_false": 60, "ecqa_pick_the_answer": 80}
FLAN_TASKS = {"creak_fact_verification:1.0.0": 120, "ecqa_answer_question:1.0.0": 90, "ecqa_explanation:1.0.0": 60}


pytestmark = pytest.mark.usefixtures("clean_task_config")


def _bind(**bindings):
  for name, value in bindings.items():
    gin.bind_parameter(name, value)


def _examples(task_name, split="train", shard_info=None):
  source = seqio.get_mixture_or_task(task_name).source
  return list(source.get_dataset(split, shuffle=False, shard_info=shard_info).as_numpy_iterator())


def _pairs(examples):
  return sorted((example["inputs"].decode(), example["targets"].decode()) for example in examples)


def _group_counts(task_name, split="train"):
  return seqio.get_mixture_or_task(task_name).source.group_sizes(split)


# ----------------------------------------------------------------------------------------------------------- P3


@pytest.mark.parametrize("layout", ["p3_parquet", "p3_tfrecord"])
def test_p3_published_layouts_register_by_gin_and_exclude_score_eval(layout):
  _bind(**{"data_root.p3_sense_3k": str(CORPORA / layout)})
  assert _group_counts("teacherlm_p3_sense_3k") == {f"p3/{name}": count for name, count in P3_PROMPTS.items()}
  discovery = seqio.get_mixture_or_task("teacherlm_p3_sense_3k").source.discover("train")
  assert discovery.excluded == ("creak_claim_true_or_false_score_eval",)
  examples = _examples("teacherlm_p3_sense_3k")
  assert len(examples) == sum(P3_PROMPTS.values())
  assert not any(b"score_eval" in example["example_id"] for example in examples)
  assert _group_counts("teacherlm_p3_sense_3k", "validation") == {"p3/creak_claim_true_or_false": 15,
                                                                  "p3/ecqa_pick_the_answer": 15}


def test_p3_parquet_and_tfrecord_layouts_give_the_same_examples():
  found = {}
  for layout in ("p3_parquet", "p3_tfrecord"):
    _bind(**{"data_root.p3_sense_3k": str(CORPORA / layout)})
    sources.clear_scan_cache()
    found[layout] = _pairs(_examples("teacherlm_p3_sense_3k"))
  assert found["p3_parquet"] == found["p3_tfrecord"]


@pytest.mark.parametrize("layout", ["p3_parquet", "p3_tfrecord"])
def test_an_included_score_eval_prompt_keeps_only_its_correct_rows(layout):
  _bind(**{"data_root.p3_sense_3k": str(CORPORA / layout),
           "selection.p3_sense_3k": (["creak_claim_true_or_false*"], [])})
  counts = _group_counts("teacherlm_p3_sense_3k")
  assert counts == {"p3/creak_claim_true_or_false": 60, "p3/creak_claim_true_or_false_score_eval": 30}
  examples = _examples("teacherlm_p3_sense_3k")
  gold = {inputs: targets for inputs, targets in _pairs(e for e in examples if b"score_eval" not in e["example_id"])}
  scored = _pairs(e for e in examples if b"score_eval" in e["example_id"])
  assert len(scored) == 30 and all(gold[inputs] == targets for inputs, targets in scored)  # never a wrong answer


def test_p3_caps_first_n_and_seeded_subsample_hold_under_sharding():
  _bind(**{"data_root.p3_sense_3k": str(CORPORA / "p3_parquet"), "caps.p3_sense_3k": 50})
  first = _examples("teacherlm_p3_sense_3k")
  assert _group_counts("teacherlm_p3_sense_3k") == {f"p3/{name}": 50 for name in P3_PROMPTS}
  lines = sorted(int(e["example_id"].decode().rsplit(":", 1)[1]) for e in first if b"ecqa" in e["example_id"])
  assert lines == list(range(1, 51))  # the first 50 rows of the file
  _bind(**{"subsample.p3_sense_3k": 7})
  sources.clear_scan_cache()
  sampled = {e["example_id"] for e in _examples("teacherlm_p3_sense_3k")}
  assert len(sampled) == 100 and sampled != {e["example_id"] for e in first}
  shards = [{e["example_id"] for e in _examples("teacherlm_p3_sense_3k", shard_info=seqio.ShardInfo(i, 2))}
            for i in range(2)]
  assert not shards[0] & shards[1] and shards[0] | shards[1] == sampled
  sources.clear_scan_cache()
  assert {e["example_id"] for e in _examples("teacherlm_p3_sense_3k")} == sampled  # deterministic


def test_a_folder_nothing_reads_is_an_error_or_a_listed_skip(tmp_path):
  root = tmp_path / "p3"
  shutil.copytree(CORPORA / "p3_parquet", root)
  (root / "cached_arrow_prompt").mkdir()
  (root / "cached_arrow_prompt" / "data-00000-of-00001.arrow").write_bytes(b"arrow")
  _bind(**{"data_root.p3_sense_3k": str(root)})
  with pytest.raises(layouts.UnreadEntry, match=r"cached_arrow_prompt: a folder without .*on_unread='skip'"):
    _group_counts("teacherlm_p3_sense_3k")
  _bind(**{"unread_policy.on_unread": "skip"})
  assert len(_group_counts("teacherlm_p3_sense_3k")) == 2
  text = "\n".join(data_sources.lines(data_sources.describe("teacherlm_p3_sense_3k")))
  assert f"SKIPPED {root / 'cached_arrow_prompt'}" in text and "excluded creak_claim_true_or_false_score_eval" in text


# --------------------------------------------------------------------------------------------------------- Flan


@pytest.mark.parametrize("layout", ["flan2021_table", "flan2021_table_jsonl"])
def test_flan_table_is_grouped_by_task_name(layout):
  _bind(**{"data_root.muffin_3w": str(CORPORA / layout)})
  assert _group_counts("teacherlm_muffin_3w") == {f"muffin/{name}": count for name, count in FLAN_TASKS.items()}
  _bind(**{"caps.muffin_3w": 70})
  sources.clear_scan_cache()
  assert _group_counts("teacherlm_muffin_3w") == {f"muffin/{name}": min(count, 70)
                                                  for name, count in FLAN_TASKS.items()}
  assert len(_examples("teacherlm_muffin_3w")) == 70 + 70 + 60


def test_flan_parquet_and_jsonl_tables_give_the_same_examples():
  found = []
  for layout in ("flan2021_table", "flan2021_table_jsonl"):
    _bind(**{"data_root.muffin_3w": str(CORPORA / layout)})
    sources.clear_scan_cache()
    found.append(_pairs(_examples("teacherlm_muffin_3w")))
  assert found[0] == found[1] and len(found[0]) == sum(FLAN_TASKS.values())


def test_flan_per_task_files_and_task_selection():
  _bind(**{"data_root.muffin_3w": str(CORPORA / "flan2021_tasks"), "selection.muffin_3w": (["*"], ["*_explanation"])})
  assert _group_counts("teacherlm_muffin_3w") == {"muffin/creak": 60, "muffin/ecqa": 60}
  assert _group_counts("teacherlm_muffin_3w", "validation") == {"muffin/creak": 15, "muffin/ecqa": 15}


# -------------------------------------------------------------------------------------------------- TeacherData


def test_teacherdata_parquet_with_other_field_names_equals_the_jsonl():
  _bind(**{"data_root.teacherdata_2m": str(CORPORA / "teacherdata_sorted")})
  jsonl = _examples("teacherlm_teacherdata_2m")
  _bind(**{"data_root.teacherdata_2m": str(CORPORA / "teacherdata_parquet"), "teacherdata_fields.id": "uid",
           "teacherdata_fields.task": None, "teacherdata_fields.question": "prompt",
           "teacherdata_fields.answer": "response", "teacherdata_fields.fundamentals": "fundamental_knowledge",
           "teacherdata_fields.chain_of_thought": "cot", "teacherdata_fields.common_mistakes": "mistakes"})
  sources.clear_scan_cache()
  parquet = _examples("teacherlm_teacherdata_2m")
  assert len(jsonl) == len(parquet) == 300
  assert [(e["example_id"], e["inputs"], e["targets"]) for e in jsonl] == [
      (e["example_id"], e["inputs"], e["targets"]) for e in parquet]


def test_teacherdata_without_a_task_field_is_read():
  _bind(**{"data_root.teacherdata_2m": str(CORPORA / "teacherdata_sorted"), "teacherdata_fields.task": "absent"})
  assert len(_examples("teacherlm_teacherdata_2m")) == 300


def test_annotation_output_is_teacherdata_as_it_is(tmp_path):
  annotated = CORPORA / "annotated" / "annotated.jsonl"
  records = [json.loads(line) for line in annotated.read_text().splitlines()]
  empty = {field: [i + 1 for i, r in enumerate(records) if not r[field]] for field in ("cot", "error")}
  _bind(**{"data_root.teacherdata_2m": str(annotated), "bad_record_policy.on_bad_record": "skip",
           "bad_record_policy.rejects_dir": str(tmp_path)})
  cot = _examples("teacherlm_teacherdata_2m_cot")
  assert len(cot) == len(records) - len(empty["cot"])  # a stage-3 teacher needs its own field only
  first = next(r for r in records if r["cot"])
  assert cot[0]["targets"].decode() == " " + first["cot"].strip()
  assert cot[0]["inputs"].decode().endswith("Let's think step by step.")
  five = seqio.get_mixture_or_task("teacherlm_teacherdata_2m").source
  scan = five.scan(five.groups("train")[0])
  assert sorted(reject.location.line for reject in scan.rejects) == sorted(empty["cot"] + empty["error"])
  assert {reject.reason for reject in scan.rejects} == {"empty"}
