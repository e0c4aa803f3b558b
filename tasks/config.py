"""gin-configurable settings of the task registry: where each corpus lives, caps, bad-record policy, vocabulary.

Tasks are registered once, at `import tasks`; these functions are called when a dataset is built, so gin bindings
made after the import (the T5X order: the gin file imports `tasks`, then binds) take effect. In a gin file:

  from tasks import config as task_config
  task_config.data_root.teacherdata_2m = 'gs://my-bucket/teacherdata'
  task_config.bad_record_policy.on_bad_record = 'skip'
  task_config.task_vocabulary.vocabulary = %VOCABULARY

or on the command line: `--gin.data_root.teacherdata_2m="'/data/teacherdata'"`.
"""

from __future__ import annotations

import pathlib
from typing import Optional

import gin
import seqio

EMBEDDED_DATA = pathlib.Path(__file__).resolve().parent / "data"
CORPORA = ("p3_sense_3k", "muffin_3w", "teacherdata_2m", "mmlu", "creak", "ecqa", "strategyqa")
POLICIES = ("raise", "skip")


@gin.configurable
def data_root(corpus: str, p3_sense_3k: str = str(EMBEDDED_DATA / "p3"),
              muffin_3w: str = str(EMBEDDED_DATA / "muffin"),
              teacherdata_2m: str = str(EMBEDDED_DATA / "teacherdata"), mmlu: str = str(EMBEDDED_DATA / "mmlu"),
              creak: str = str(EMBEDDED_DATA / "creak"), ecqa: str = str(EMBEDDED_DATA / "ecqa"),
              strategyqa: str = str(EMBEDDED_DATA / "strategyqa")) -> str:
  """Root directory (local or gs://) of `corpus`; defaults are the samples embedded in the package.

  Layouts under each root (the published ones; `tasks.layouts` has them in full):
    p3_sense_3k     <prompt>/<split>-00000-of-00001.parquet (the hub today), data/<prompt>/<split>.tfrecord-*
                    (older revisions: seqio caches), or <prompt>/<split>.jsonl; `inputs_pretokenized` /
                    `targets_pretokenized` (or `inputs` / `targets`)
    muffin_3w       a Flan 2021 table with a `task_name` column (<split>-*.parquet, <split>.jsonl), per-task files
                    <split>/<task>_10templates.jsonl, or <task>/<split>.{jsonl,tfrecord-*,parquet}
    teacherdata_2m  <split>.jsonl, <split>-*.jsonl, <split>-*.parquet or <split>.tfrecord-* (field names:
                    `teacherdata_fields`)
    mmlu            {dev,val,test}/<subject>_<split>.csv  (Hendrycks layout)
    creak, ecqa, strategyqa   <split>.jsonl  (the datasets' own fields)
  """
  roots = dict(p3_sense_3k=p3_sense_3k, muffin_3w=muffin_3w, teacherdata_2m=teacherdata_2m, mmlu=mmlu,
               creak=creak, ecqa=ecqa, strategyqa=strategyqa)
  if corpus not in roots:
    raise KeyError(f"unknown corpus {corpus!r}; known: {sorted(roots)}")
  return roots[corpus]


def embedded_root(corpus: str) -> bool:
  """True when `corpus` reads the sample embedded in the package (its data_root is the default)."""
  return str(data_root(corpus)).rstrip("/").startswith(str(EMBEDDED_DATA))


@gin.configurable
def caps(corpus: str, p3_sense_3k: int = 3000, muffin_3w: int = 30000) -> Optional[int]:
  """Most training examples one P3 prompt / Muffin task contributes (the paper's 3K and 3W = 30,000)."""
  return {"p3_sense_3k": p3_sense_3k, "muffin_3w": muffin_3w}.get(corpus)


@gin.configurable
def subsample(corpus: str, p3_sense_3k: Optional[int] = None, muffin_3w: Optional[int] = None) -> Optional[int]:
  """Which records a cap keeps: None = the first ones in file order (default); an int = a random subsample seeded
  by it (the records with the smallest hash of (seed, file name, record number): the same on every host and run)."""
  return {"p3_sense_3k": p3_sense_3k, "muffin_3w": muffin_3w}.get(corpus)


@gin.configurable
def selection(corpus: str, p3_sense_3k: tuple = (("*",), ("*_score_eval",)), muffin_3w: tuple = (("*",), ())
              ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(include globs, exclude globs) over a corpus' group names (P3 prompts, Flan task names): a group is read when
  it matches an include glob and no exclude glob. P3's `*_score_eval` prompts are excluded by default (they repeat
  each example once per answer choice); included, they keep only their `is_correct` rows. In gin:

    task_config.selection.p3_sense_3k = (['super_glue_*', 'cos_e_*'], ['*_score_eval'])
  """
  chosen = {"p3_sense_3k": p3_sense_3k, "muffin_3w": muffin_3w}.get(corpus, (("*",), ()))
  include, exclude = chosen
  return tuple(include), tuple(exclude)


@gin.configurable
def unread_policy(on_unread: str = "raise") -> str:
  """What a folder or file under a corpus root that no reader reads does: 'raise' (default) stops with an error
  naming it; 'skip' skips it and lists it in the log and in `inspect_task --sources`."""
  if on_unread not in POLICIES:
    raise ValueError(f"on_unread={on_unread!r}; expected one of {POLICIES}")
  return on_unread


@gin.configurable
def flan_layout(layout: str = "auto") -> str:
  """The Flan 2021 / Muffin layout: 'table' (one table with a task column), 'task_files'
  (<split>/<task>_10templates.jsonl), 'task_dirs' (<task>/<split>.*), or 'auto' (the first of these found)."""
  return layout


@gin.configurable
def flan_task_field(field: str = "task_name") -> str:
  """The task column of a Flan table (the Flan 2021 submix: `task_name`)."""
  return field


@gin.configurable
def teacherdata_fields(id: Optional[str] = "id", task: Optional[str] = "task", question: str = "question",
                       answer: str = "answer", fundamentals: str = "fundamentals",
                       chain_of_thought: str = "chain_of_thought", common_mistakes: str = "common_mistakes"
                       ) -> dict[str, Optional[str]]:
  """TeacherData field names in the files (`id` and `task` optional: None, or absent from a record, is allowed).
  Records of the annotation loop's output (`fundamental`, `cot`, `error`) are read as they are, whatever these say.
  In gin: `task_config.teacherdata_fields.question = 'prompt'`."""
  return dict(id=id, task=task, question=question, answer=answer, fundamentals=fundamentals,
              chain_of_thought=chain_of_thought, common_mistakes=common_mistakes)


@gin.configurable
def bad_record_policy(on_bad_record: str = "raise", rejects_dir: Optional[str] = None) -> tuple[str, Optional[str]]:
  """What a bad record does: 'raise' (default) stops with an error naming file, line and field; 'skip' counts it,
  logs a warning and writes it to `<rejects_dir>/<group>.rejects.jsonl` (a group is a corpus split, a P3 prompt or a
  Muffin task; the default directory is the system temp dir's `teacherlm_rejects/`). Nothing is dropped silently."""
  if on_bad_record not in POLICIES:
    raise ValueError(f"on_bad_record={on_bad_record!r}; expected one of {POLICIES}")
  return on_bad_record, rejects_dir


@gin.configurable
def task_vocabulary(vocabulary: Optional[seqio.Vocabulary] = None) -> seqio.Vocabulary:
  """The vocabulary every registered task tokenizes with (default: bytes, for the tiny configs)."""
  return vocabulary or seqio.ByteVocabulary()


@gin.configurable
def cache_dirs(dirs: tuple = ()) -> tuple[str, ...]:
  """Where prepared caches are looked for (`python -m teacherlm_jax.prepare --output_cache_dir`); train.gin's
  CACHE_DIRS. A task is read from the first that holds it complete (seqio's global cache directories)."""
  return tuple(dirs)
