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

  Layouts under each root:
    p3_sense_3k     <prompt>/<split>.tfrecord-*  (P3's layout; `inputs_pretokenized`, `targets_pretokenized`)
                    or <prompt>/<split>.jsonl (`inputs`, `targets`)
    muffin_3w       <task>/<split>.jsonl or <task>/<split>.tfrecord-*  (`inputs`, `targets`)
    teacherdata_2m  <split>.jsonl, <split>-*.jsonl or <split>.tfrecord-*  (id, task, question, answer,
                    fundamentals, chain_of_thought, common_mistakes)
    mmlu            {dev,val,test}/<subject>_<split>.csv  (Hendrycks layout)
    creak, ecqa, strategyqa   <split>.jsonl  (the datasets' own fields)
  """
  roots = dict(p3_sense_3k=p3_sense_3k, muffin_3w=muffin_3w, teacherdata_2m=teacherdata_2m, mmlu=mmlu,
               creak=creak, ecqa=ecqa, strategyqa=strategyqa)
  if corpus not in roots:
    raise KeyError(f"unknown corpus {corpus!r}; known: {sorted(roots)}")
  return roots[corpus]


@gin.configurable
def caps(corpus: str, p3_sense_3k: int = 3000, muffin_3w: int = 30000) -> Optional[int]:
  """Most training examples one P3 prompt / Muffin task contributes (the paper's 3K and 3W = 30,000)."""
  return {"p3_sense_3k": p3_sense_3k, "muffin_3w": muffin_3w}.get(corpus)


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
