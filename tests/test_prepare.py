"""Preparation on Apache Beam (DirectRunner, several workers) into seqio caches, and training from them: the same
examples as the uncached path, disjoint shard files per host, a task-sorted corpus mixed from the first batch, no
scan at start, and a cache of another configuration refused."""

import json
import pathlib

import gin
import pytest
import seqio
import tensorflow as tf

import tasks  # noqa: F401  (registers the tasks)
from tasks import registration, sources
from teacherlm_jax import data_sources, gin_utils, input_pipeline, prepare, train

REPO = pathlib.Path(__file__).resolve().parents[1]
CORPORA = REPO / "tests" / "fixtures" / "corpora"
BINDINGS = {"data_root.p3_sense_3k": str(CORPORA / "p3_parquet"), "data_root.muffin_3w": str(CORPORA / "flan2021_table"),
            "caps.muffin_3w": 80}
SORTED_SHARES = {"creak": 1600, "ecqa": 1300, "ecqa_reversed": 700, "creak_entity": 400}


def _configure(**bindings):
  gin.clear_config()
  sources.clear_scan_cache()
  for name, value in {**BINDINGS, **bindings}.items():
    gin.bind_parameter(name, value)


@pytest.fixture(autouse=True)
def no_cache_leaks():
  """seqio keeps the cache directories and each task's found cache for the process: forget them after a test."""
  yield
  seqio.utils.set_global_cache_dirs([])
  for name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.get(name)._cache_dir = None


@pytest.fixture(scope="module")
def sorted_teacherdata(tmp_path_factory) -> pathlib.Path:
  """4,000 TeacherData rows sorted by task (every row of a task, then the next): the fixture's rows, repeated."""
  rows = [json.loads(line) for line in (CORPORA / "teacherdata_sorted" / "train.jsonl").read_text().splitlines()]
  root = tmp_path_factory.mktemp("sorted_teacherdata")
  with (root / "train.jsonl").open("w") as handle:
    for task, count in SORTED_SHARES.items():
      own = [row for row in rows if row["task"] == task]
      for i in range(count):
        handle.write(json.dumps({**own[i % len(own)], "id": f"{task}-{i}"}) + "\n")
  return root


@pytest.fixture(scope="module")
def caches(tmp_path_factory, sorted_teacherdata):
  """The stage-1 mixture (P3 Parquet with its score_eval twin, a Flan 2021 table) on 2 multi-processing workers,
  and the task-sorted TeacherData, prepared into seqio caches."""
  out = tmp_path_factory.mktemp("caches")
  _configure()
  prepare.prepare(["teacherlm_stage1_multitask"], str(out), ["train"], num_shards=4,
                  beam_options=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
  _configure(**{"data_root.teacherdata_2m": str(sorted_teacherdata)})
  prepare.prepare(["teacherlm_teacherdata_2m"], str(out), ["train"], num_shards=16)
  yield out
  gin.clear_config()
  seqio.utils.set_global_cache_dirs([])


def _hashes(task_name, use_cached, shard_info=None, cache_dir=None):
  if cache_dir:
    seqio.add_global_cache_dirs([str(cache_dir)])
  task = seqio.get_mixture_or_task(task_name)
  data = task.get_dataset(sequence_length=None, split="train", use_cached=use_cached, shuffle=False,
                          shard_info=shard_info, try_in_mem_cache=False)
  return [int(example["example_hash"][0]) for example in data.as_numpy_iterator()]


@pytest.mark.parametrize("task_name", ["teacherlm_p3_sense_3k", "teacherlm_muffin_3w"])
def test_the_caches_hold_the_uncached_examples_capped_and_without_score_eval(caches, task_name):
  _configure()
  cached, uncached = _hashes(task_name, True, cache_dir=caches), _hashes(task_name, False)
  assert sorted(cached) == sorted(uncached) and len(cached) == len(set(cached))
  task = seqio.get_mixture_or_task(task_name)
  directory = caches / task_name
  assert json.loads((directory / "stats.train.json").read_text())["examples"] == len(uncached)
  assert json.loads((directory / "groups.train.json").read_text()) == task.source.group_sizes("train")
  assert sorted(p.name for p in directory.glob("train.tfrecord-*")) == [
      f"train.tfrecord-0000{i}-of-00004" for i in range(4)]
  if task_name == "teacherlm_muffin_3w":  # the cap holds: 80 of the 120 and of the 90, all 60 of the last
    assert sorted(json.loads((directory / "groups.train.json").read_text()).values()) == [60, 80, 80]


def test_two_hosts_read_disjoint_shard_files_whose_union_is_the_data(caches):
  _configure()
  seqio.add_global_cache_dirs([str(caches)])
  everything = _hashes("teacherlm_p3_sense_3k", True)
  files = sorted((caches / "teacherlm_p3_sense_3k").glob("train.tfrecord-*"))
  spec = {"example_hash": tf.io.VarLenFeature(tf.int64)}
  per_file = {path.name: [int(tf.sparse.to_dense(tf.io.parse_single_example(record, spec)["example_hash"])[0])
                          for record in tf.data.TFRecordDataset(str(path))] for path in files}
  hosts = [_hashes("teacherlm_p3_sense_3k", True, seqio.ShardInfo(i, 2)) for i in range(2)]
  assert not set(hosts[0]) & set(hosts[1]) and sorted(hosts[0] + hosts[1]) == sorted(everything)
  for i, host in enumerate(hosts):  # each host read exactly the files i, i+2
    assert sorted(host) == sorted(h for path in files[i::2] for h in per_file[path.name])


def _task_shares(examples):
  counts = {task: 0 for task in SORTED_SHARES}
  for example in examples:
    counts[example["example_id"].decode().rsplit("-", 1)[0]] += 1
  return {task: count / len(examples) for task, count in counts.items()}


def test_a_task_sorted_corpus_is_mixed_from_the_first_batch(caches, sorted_teacherdata):
  _configure(**{"data_root.teacherdata_2m": str(sorted_teacherdata)})
  seqio.add_global_cache_dirs([str(caches)])
  task = seqio.get_mixture_or_task("teacherlm_teacherdata_2m")
  expected = {task_name: count / sum(SORTED_SHARES.values()) for task_name, count in SORTED_SHARES.items()}
  for use_cached in (True, False):
    data = task.get_dataset(sequence_length=None, split="train", use_cached=use_cached, shuffle=True, seed=5,
                            shuffle_buffer_size=256, try_in_mem_cache=False)
    shares = _task_shares(list(data.take(3000).as_numpy_iterator()))
    gaps = {name: abs(shares[name] - expected[name]) for name in expected}
    if use_cached:
      assert max(gaps.values()) < 0.03, shares
    else:  # the file order with a shuffle buffer alone: the last task's rows (3,600-4,000) are never reached
      assert shares["creak_entity"] == 0.0 and max(gaps.values()) > 0.05, shares


def test_training_reads_the_caches_without_a_scan_and_refuses_another_configuration(caches, tmp_path):
  gin.clear_config()
  bindings = [f"{name}={value!r}" for name, value in BINDINGS.items()] + [
      "MIXTURE_OR_TASK_NAME='teacherlm_stage1_multitask'", f"MODEL_DIR='{tmp_path / 'run'}'", "TRAIN_STEPS=3",
      "BATCH_SIZE=8", "TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}", "USE_CACHED=True",
      f"CACHE_DIRS=['{caches}']", "train.save_every=3"]
  files = [str(REPO / "gin" / "runs" / "train.gin"), str(REPO / "gin" / "models" / "tiny.gin")]
  gin_utils.parse_gin(files, bindings)
  sources.clear_scan_cache()
  before = sources.records_rendered()
  result = gin.get_configurable(train.train)()
  assert result.final_step == 3 and sources.records_rendered() == before  # no record read to count or render
  mixture = seqio.get_mixture_or_task("teacherlm_stage1_multitask")
  rates = {task.name: registration.examples_rate(task) for task in mixture.tasks}
  assert rates == {"teacherlm_p3_sense_3k": 140.0, "teacherlm_muffin_3w": 220.0}  # from the caches' stats
  lines = "\n".join(data_sources.lines(data_sources.describe("teacherlm_stage1_multitask", use_cached=True)))
  assert "layout prepared cache" in lines and "group p3/ecqa_pick_the_answer: 80 examples" in lines
  gin.bind_parameter("caps.muffin_3w", 50)
  config = input_pipeline.DataConfig("teacherlm_stage1_multitask", {"inputs": 64, "targets": 64}, batch_size=4,
                                     use_cached=True)
  with pytest.raises(ValueError, match=r"teacherlm_muffin_3w .* another configuration \(cap: cache 80 vs now 50\)"):
    input_pipeline.BatchIterator(config, process_index=0, process_count=1)
  gin.clear_config()


def test_skipped_bad_records_are_written_beside_the_cache(tmp_path):
  root = tmp_path / "teacherdata"
  root.mkdir()
  lines = (CORPORA / "teacherdata_sorted" / "train.jsonl").read_text().splitlines()[:20]
  lines[4] = '{"id": "broken", "question": '
  lines[9] = json.dumps({**json.loads(lines[9]), "answer": ""})
  (root / "train.jsonl").write_text("\n".join(lines) + "\n")
  _configure(**{"data_root.teacherdata_2m": str(root), "bad_record_policy.on_bad_record": "skip"})
  prepare.prepare(["teacherlm_teacherdata_2m"], str(tmp_path / "cache"), ["train"], num_shards=2)
  directory = tmp_path / "cache" / "teacherlm_teacherdata_2m"
  rejects = [json.loads(line) for line in (directory / "rejects.train.jsonl").read_text().splitlines()]
  assert [(r["line"], r["field"], r["reason"][:12]) for r in rejects] == [(5, None, "invalid JSON"),
                                                                          (10, "answer", "empty")]
  assert json.loads((directory / "stats.train.json").read_text())["examples"] == 18
  assert (directory / "COMPLETED").exists()
  gin.clear_config()


def test_the_cached_input_resumes_from_its_saved_iterators(caches, tmp_path):
  _configure(**{"cache_dirs.dirs": [str(caches)]})
  config = input_pipeline.DataConfig("teacherlm_stage1_multitask", {"inputs": 64, "targets": 64}, batch_size=4,
                                     use_cached=True, num_data_shards=2)
  uninterrupted = input_pipeline.BatchIterator(config, process_index=0, process_count=1)
  batches = [next(uninterrupted) for _ in range(6)]
  saved = input_pipeline.BatchIterator(config, process_index=0, process_count=1)
  for _ in range(4):
    next(saved)
  saved.save(str(tmp_path / "state"))
  resumed = input_pipeline.BatchIterator(config, 4, restore_from=str(tmp_path / "state"), process_index=0,
                                         process_count=1)
  for expected in batches[4:]:
    actual = next(resumed)
    assert all((actual[name] == expected[name]).all() for name in expected)
  gin.clear_config()
