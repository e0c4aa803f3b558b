"""Learning by teaching's problems and exams: which similar problems a worked example is examined on.

A `Problem` is a rank-classifiable record: the question with its options inlined (`(A) ... (B) ...`), the option
letters, the gold letter and the task (the record's `task` field, else its input file). For every teaching problem
(TP) an exam is `exam_size` problems of the same task from the exam pool (any of the pool's problems when the pool
has no problem of that task, e.g. a separate pool file without `task` fields) (never the TP itself, nor a problem with
the same question), chosen by

  random     seeded by (seed, TP index): the same exams for the same seed, whatever the order of the problems
  tfidf      the nearest questions by cosine similarity of TF-IDF vectors, idf = ln((1 + n) / (1 + df)) over the
             pool: a word in every question (CREAK's template, `Determine the correctness of the following
             sentence ... (A) True (B) False`) weighs 0, so the content words decide (raw word overlap would rank the
             shortest questions first)
  embedding  the nearest questions by cosine similarity of mean-pooled final hidden states of a checkpoint
             (`embed_questions`; padding excluded)

Ties go to the lower pool position, so every strategy is deterministic. An exam problem's gold letter is what its
answers are scored against; the TP's own gold letter is never read here.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tasks import formats, rendering
from teacherlm_jax import annotation_inputs, checkpoints, convert, decoding, partitioning, shell, vocabularies

log = shell.log
STRATEGIES = ("random", "tfidf", "embedding")


@dataclasses.dataclass(frozen=True)
class Problem:
  """A rank-classifiable problem: its input index, question (options inlined), option letters, gold letter, task."""

  index: int
  question: str
  letters: tuple[str, ...]
  answer: str
  task: str = ""


def option_letters(question: str) -> tuple[str, ...]:
  """The letters of the options inlined in a question: `(A) ... (B) ...` -> ('A', 'B')."""
  letters = []
  for letter in rendering.LETTERS:
    if f"({letter}) " not in question and not question.endswith(f"({letter})"):
      break
    letters.append(letter)
  return tuple(letters)


def read_problems(spec: annotation_inputs.InputSpec) -> list[Problem]:
  """The rank-classifiable records of an input (a letter answer among the inlined options); the others are
  skipped with a warning naming the record and a count in the log."""
  problems, skipped = [], 0
  for index, location, record in annotation_inputs.iter_items(spec):
    try:
      if isinstance(record, formats.BadRecord):
        raise record
      original = {k: v for k, v in record.items() if k not in annotation_inputs.OUTPUT_FIELDS}
      sample = annotation_inputs.sample(spec, location, original)
      letter, letters = rendering.answer_letter(sample.answer), option_letters(sample.question)
      if letter not in letters:
        raise ValueError(f"answer {letter} is not among the options {letters}")
      problems.append(Problem(index, sample.question, letters, letter, str(record.get("task", location.path))))
    except (formats.BadRecord, ValueError) as error:
      skipped += 1
      log.warning("LbT: %s: not a rank-classification problem, skipped (%s)", location, error)
  log.info("LbT: %d problems from %s (%d skipped)", len(problems), spec.source, skipped)
  return problems


def problem_record(problem: Problem) -> dict:
  """A problem as an input record (`question`, `answer`, `task`), for an annotation run over exam problems."""
  return {"question": problem.question, "answer": f"({problem.answer})", "task": problem.task}


def tfidf_vectors(texts: Sequence[str]) -> np.ndarray:
  """L2-normalised TF-IDF rows [n, vocabulary] over lower-cased words; idf = ln((1 + n) / (1 + df))."""
  words = [re.findall(r"\w+", text.lower()) for text in texts]
  vocabulary = {word: i for i, word in enumerate(sorted({w for row in words for w in row}))}
  counts = np.zeros((len(texts), len(vocabulary)), np.float64)
  for row, row_words in enumerate(words):
    for word, count in collections.Counter(row_words).items():
      counts[row, vocabulary[word]] = count
  idf = np.log((1 + len(texts)) / (1 + (counts > 0).sum(axis=0)))
  return _normalised(counts * idf)


def _normalised(vectors: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(vectors, axis=1, keepdims=True)
  return vectors / np.where(norms > 0, norms, 1.0)


def embed_questions(checkpoint: str, texts: Sequence[str], batch_size: int, max_length: int,
                    mesh: jax.sharding.Mesh) -> np.ndarray:
  """L2-normalised mean-pooled final hidden states [n, e] of `checkpoint` (right-padded rows; padding excluded)."""
  model, params = convert.load_model(checkpoint, mesh=mesh)
  vocabulary = checkpoints.load_vocabulary(checkpoints.resolve(checkpoint))
  if vocabulary is None:
    raise FileNotFoundError(f"embedding checkpoint {checkpoint} records no vocabulary (vocabulary.json / "
                            "tokenizer.json)")

  @jax.jit
  def pooled(params, tokens, mask):
    hidden = model.apply({"params": params}, tokens, mask, hidden_only=True).astype(jnp.float32)
    return jnp.sum(hidden * mask[..., None], axis=1) / jnp.maximum(mask.sum(axis=1, keepdims=True), 1)

  rows = [vocabularies.encode_prompt(vocabulary, text, max_length) for text in texts]
  result = np.zeros((len(texts), 0), np.float32)
  multiple = partitioning.data_parallel_size(mesh)
  with partitioning.activation_rules(mesh):
    for positions, length in decoding.plan_batches([len(r) for r in rows], batch_size, max_length):
      batch = positions + [positions[0]] * (decoding.batch_rows(len(positions), batch_size, multiple) - len(positions))
      tokens, mask = np.zeros((len(batch), length), np.int32), np.zeros((len(batch), length), np.int32)
      for row, position in enumerate(batch):
        tokens[row, :len(rows[position])], mask[row, :len(rows[position])] = rows[position], 1
      vectors = np.asarray(pooled(params, tokens, mask))
      if not result.shape[1]:
        result = np.zeros((len(texts), vectors.shape[1]), np.float32)
      result[positions] = vectors[:len(positions)]
  return _normalised(result)


def choose_exams(problems: Sequence[Problem], pool: Sequence[Problem], exam_size: int, strategy: str, seed: int,
                 same_pool: bool, vectors: Optional[np.ndarray] = None) -> dict[int, list[int]]:
  """{teaching problem index: exam problem indices (into the pool's input)}; deterministic for a seed.

  `vectors` [len(problems) + len(pool), d]: the problems' then the pool's normalised vectors (strategies tfidf and
  embedding; `exam_vectors` makes them).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"exam_strategy must be one of {STRATEGIES}, got {strategy!r}")
  exams, tasks = {}, {p.task for p in pool}
  for row, problem in enumerate(problems):
    allowed = [j for j, p in enumerate(pool) if (p.task == problem.task or problem.task not in tasks)
               and p.question != problem.question and not (same_pool and p.index == problem.index)]
    if len(allowed) < exam_size:
      raise ValueError(f"exam_size {exam_size} is larger than the {len(allowed)} problems of the exam pool for "
                       f"problem {problem.index} (task {problem.task!r}); lower EXAM_SIZE or add exam problems")
    if strategy == "random":
      chosen = list(np.random.default_rng([seed, problem.index]).choice(allowed, exam_size, replace=False))
    else:
      similarity = vectors[len(problems) + np.asarray(allowed)] @ vectors[row]
      order = sorted(range(len(allowed)), key=lambda j: (-round(float(similarity[j]), 9), allowed[j]))
      chosen = [allowed[j] for j in order[:exam_size]]
    exams[problem.index] = [pool[int(j)].index for j in chosen]
  return exams


def exam_vectors(problems: Sequence[Problem], pool: Sequence[Problem], strategy: str,
                 embedding_checkpoint: Optional[str], batch_size: int, max_length: int,
                 mesh: jax.sharding.Mesh) -> Optional[np.ndarray]:
  """The vectors `choose_exams` compares: TF-IDF over the pool's vocabulary, or the checkpoint's embeddings."""
  texts = [p.question for p in problems] + [p.question for p in pool]
  if strategy == "tfidf":
    return tfidf_vectors(texts)
  if strategy == "embedding":
    if not embedding_checkpoint:
      raise ValueError("exam_strategy 'embedding' needs embedding_checkpoint (a checkpoint whose mean-pooled "
                       "hidden states embed the questions)")
    unique = sorted(set(texts))
    embedded = embed_questions(embedding_checkpoint, unique, batch_size, max_length, mesh)
    where = {text: i for i, text in enumerate(unique)}
    return embedded[[where[text] for text in texts]]
  return None

