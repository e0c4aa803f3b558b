"""Learning by teaching (LbT, Ning et al. 2024, "Can LLMs Learn by Teaching?") for TeacherLM teachers.

  python -m teacherlm_jax.lbt score --gin_file=gin/runs/lbt.gin --gin.INPUT="'problems.jsonl'" \\
      --gin.OUTPUT_DIR="'/tmp/lbt'" --gin.TEACHER="('cot', '/runs/stage3_cot')" --gin.STUDENTS="['/runs/student']"
  python -m teacherlm_jax.lbt select --gin_file=gin/runs/lbt.gin ... --gin.SELECTION="'max'"

M1 scoring (`score`), in OUTPUT_DIR:
  candidates/       K candidate rationales per teaching problem: one annotation run (`teacherlm_jax.annotate`) with
                    the one teacher and num_samples=K, so each problem is prefilled once and sampled in K slots
                    (streams (problem index, k), `teacherlm_jax.engine`); resumable per chunk like any annotation run
  exams.jsonl       for each teaching problem, EXAM_SIZE exam problems of the same task (a record's `task` field, else
                    its input file): `random` (seeded, never the problem itself) or `lexical` (the most similar
                    questions by word-set Jaccard overlap)
  scores.jsonl      one row per (problem, candidate): the rationale, `lbt_score` = the students' exam accuracy when
                    the candidate (its full annotated text: question, answer, trigger, rationale) is the in-context
                    example before each exam question (rank classification, `teacherlm_jax.evaluate`), and
                    `gold_log_likelihood` = their mean log-likelihood of the exam answers (the tie-breaker)
Every stage is skipped when its output exists, so an interrupted run resumes. Cost: problems x K x EXAM_SIZE exam
prompts per student, each one rank-classification context (all options scored from one encoding).

Selection (`select`) writes OUTPUT_DIR/selected/annotated.jsonl in the annotation loop's format:
  max             per problem, the candidate with the best (lbt_score, gold_log_likelihood)
  weighted_vote   each candidate's answer is the letter the teacher ranks highest after its own rationale
                  (`... {rationale} So the answer is (`); the answer with the largest sum of LbT scores wins, and the
                  best candidate with that answer is kept; `provenance.lbt.voted_answer` and `agrees_with_gold` say
                  whether the vote matched the record's answer.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any, Optional, Sequence

import gin
import jax
import numpy as np
from etils import epath

from tasks import formats, rendering
from teacherlm_jax import (annotate, annotation_inputs, annotation_store, checkpoints, convert, evaluate,
                           partitioning, shell)

log = shell.log
STRATEGIES = ("random", "lexical")
SELECTIONS = ("max", "weighted_vote")
VOTE_SUFFIX = " So the answer is ("


@dataclasses.dataclass(frozen=True)
class LbtConfig:
  """An LbT scoring run (see the module docstring).

  Attributes:
    input: the teaching problems; exam_input: the exam pool (None: the teaching problems themselves).
    output_dir: where candidates, exams, scores and selections go.
    teacher: (teacher kind, checkpoint), e.g. ('cot', '/runs/stage3_cot'); students: student checkpoints.
    num_candidates (K), exam_size, exam_strategy: what is sampled and how exams are chosen.
    annotation: decoding settings for the candidates (temperature > 0: candidates must differ).
    batch_size, max_length: rank-classification batches and the longest exam context (longer keep their end).
  """

  input: annotation_inputs.InputSpec
  output_dir: str
  teacher: tuple[str, str]
  students: tuple[str, ...]
  exam_input: Optional[annotation_inputs.InputSpec] = None
  num_candidates: int = 4
  exam_size: int = 4
  exam_strategy: str = "random"
  max_new_tokens: int = 128
  temperature: float = 1.0
  top_k: int = 50
  top_p: float = 1.0
  seed: int = 0
  max_input_length: int = 512
  batch_size: int = 32
  max_length: int = 2048
  mesh_shape: tuple[int, int, int] = (1, -1, 1)

  def __post_init__(self):
    if self.exam_strategy not in STRATEGIES:
      raise ValueError(f"exam_strategy must be one of {STRATEGIES}, got {self.exam_strategy!r}")
    if self.num_candidates < 1 or self.exam_size < 1 or not self.students:
      raise ValueError("num_candidates and exam_size must be positive, and at least one student is needed")

  @property
  def field(self) -> str:
    return rendering.TEACHERS[self.teacher[0]][1]


# ----------------------------------------------------------------------------------------------- problems


@dataclasses.dataclass(frozen=True)
class Problem:
  """A rank-classifiable problem: its input index, question (options inlined), option letters, gold letter and task
  (the record's `task` field, else its input file)."""

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
  """The rank-classifiable records of an input (a letter answer among the inlined options); others are skipped
  with a count in the log."""
  problems, skipped = [], 0
  for index, location, record in annotation_inputs.iter_items(spec):
    try:
      if isinstance(record, formats.BadRecord):
        raise record
      sample = annotation_inputs.samples.sample(location, {k: v for k, v in record.items()
                                                           if k not in annotation_inputs.OUTPUT_FIELDS})
      letter, letters = rendering.answer_letter(sample.answer), option_letters(sample.question)
      if letter not in letters:
        raise ValueError(f"answer {letter} is not among the options {letters}")
      problems.append(Problem(index, sample.question, letters, letter, str(record.get("task", location.path))))
    except (formats.BadRecord, ValueError) as error:
      skipped += 1
      log.warning("LbT: %s: not a rank-classification problem, skipped (%s)", location, error)
  log.info("LbT: %d problems from %s (%d skipped)", len(problems), spec.source, skipped)
  return problems


def choose_exams(problems: Sequence[Problem], pool: Sequence[Problem], exam_size: int, strategy: str, seed: int,
                 same_pool: bool) -> dict[int, list[int]]:
  """{teaching problem index: exam problem indices (into the pool's input)}; deterministic for a seed."""
  exams = {}
  words = [set(re.findall(r"\w+", p.question.lower())) for p in pool]
  for problem in problems:
    allowed = [j for j, p in enumerate(pool) if not (same_pool and p.index == problem.index)
               and (not same_pool or p.task == problem.task)]
    if len(allowed) < exam_size:
      raise ValueError(f"exam_size {exam_size} is larger than the {len(allowed)} problems of the exam pool for "
                       f"problem {problem.index} (task {problem.task!r})")
    if strategy == "random":
      chosen = np.random.default_rng([seed, problem.index]).choice(allowed, exam_size, replace=False)
    else:
      own = set(re.findall(r"\w+", problem.question.lower()))
      overlap = [len(own & words[j]) / max(len(own | words[j]), 1) for j in allowed]
      chosen = [allowed[j] for j in sorted(range(len(allowed)), key=lambda j: (-overlap[j], allowed[j]))[:exam_size]]
    exams[problem.index] = [pool[j].index for j in chosen]
  return exams


# ----------------------------------------------------------------------------------------------- scoring


def candidate_config(config: LbtConfig) -> annotate.AnnotationConfig:
  return annotate.AnnotationConfig(
      input=config.input, output_dir=str(epath.Path(config.output_dir) / "candidates"),
      teachers=(config.teacher,), max_input_length=config.max_input_length, max_new_tokens=config.max_new_tokens,
      temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, seed=config.seed,
      batch_size=config.batch_size, mesh_shape=config.mesh_shape, num_samples=config.num_candidates)


def read_candidates(config: LbtConfig) -> dict[tuple[int, int], dict]:
  """{(problem index, candidate k): annotated record}."""
  candidates = {}
  path = epath.Path(config.output_dir) / "candidates" / annotation_store.OUTPUT_FILE
  for line in path.read_text().splitlines():
    record = json.loads(line)
    candidates[(record["provenance"]["index"], record["provenance"].get("sample", 0))] = record
  return candidates


def exam_examples(teaching_text: str, exam: Sequence[Problem]) -> list[evaluate.EvalExample]:
  """The exam prompts of one candidate: its annotated text as the in-context example before each exam question."""
  return [evaluate.EvalExample(f"{teaching_text.rstrip()} {rendering.eval_context(p.question)}", p.letters,
                               p.letters.index(p.answer), str(p.index)) for p in exam]


def student_scores(student: str, examples: Sequence[evaluate.EvalExample], config: LbtConfig,
                   mesh: jax.sharding.Mesh) -> tuple[np.ndarray, np.ndarray]:
  """(correct [n], gold log-likelihood [n]) of one student on every exam prompt."""
  model, params = convert.load_model(student, mesh=mesh)
  vocabulary = checkpoints.load_vocabulary(checkpoints.resolve(student))
  if vocabulary is None:
    raise FileNotFoundError(f"student {student} records no vocabulary (vocabulary.json / tokenizer.json)")
  score = evaluate.jit_score(model, mesh)
  with partitioning.activation_rules(mesh):
    scores = evaluate.score_examples(examples, lambda *a: score(params, *a), vocabulary, config.batch_size,
                                     config.max_length, desc=f"exam {epath.Path(student).name}",
                                     row_multiple=partitioning.data_parallel_size(mesh))
  correct = np.asarray([int(np.argmax(s)) == e.target for e, s in zip(examples, scores)], np.float32)
  gold = np.asarray([s[e.target] for e, s in zip(examples, scores)], np.float64)
  return correct, gold


def score(config: LbtConfig) -> str:
  """M1: candidates, exams and LbT scores (each stage skipped when done); returns the path of scores.jsonl."""
  out = epath.Path(config.output_dir)
  annotate.run(candidate_config(config))
  problems = read_problems(config.input)
  pool = read_problems(config.exam_input) if config.exam_input else problems
  exams_path = out / "exams.jsonl"
  if not exams_path.exists():
    exams = choose_exams(problems, pool, config.exam_size, config.exam_strategy, config.seed,
                         same_pool=config.exam_input is None)
    annotation_store.write_jsonl_atomically(exams_path, ({"index": i, "exam": e} for i, e in exams.items()))
  exams = {row["index"]: row["exam"] for row in map(json.loads, exams_path.read_text().splitlines())}
  scores_path = out / "scores.jsonl"
  if not scores_path.exists():
    annotation_store.write_jsonl_atomically(scores_path, score_rows(config, problems, pool, exams))
  return str(scores_path)


def score_rows(config: LbtConfig, problems: Sequence[Problem], pool: Sequence[Problem],
               exams: dict[int, list[int]]) -> list[dict]:
  """One row per (problem, candidate) with its LbT score."""
  by_index = {p.index: p for p in pool}
  candidates = read_candidates(config)
  keys = [(p.index, k) for p in problems for k in range(config.num_candidates) if (p.index, k) in candidates]
  examples = [e for key in keys for e in exam_examples(candidates[key]["all"], [by_index[j] for j in exams[key[0]]])]
  log.info("LbT: %d candidates x %d exam problems x %d students = %d exam prompts", len(keys), config.exam_size,
           len(config.students), len(examples) * len(config.students))
  mesh = partitioning.make_mesh(*config.mesh_shape)
  results = [student_scores(student, examples, config, mesh) for student in config.students]
  correct = np.mean([c for c, _ in results], axis=0).reshape(len(keys), config.exam_size)
  gold = np.mean([g for _, g in results], axis=0).reshape(len(keys), config.exam_size)
  return [{"index": index, "candidate": k, "rationale": candidates[(index, k)][config.field],
           "lbt_score": float(correct[row].mean()), "gold_log_likelihood": float(gold[row].mean()),
           "exam": exams[index], "text": candidates[(index, k)]["all"]}
          for row, (index, k) in enumerate(keys)]


# ----------------------------------------------------------------------------------------------- selection


def read_scores(path: str) -> dict[int, list[dict]]:
  """{problem index: its candidates' score rows, by candidate}."""
  rows: dict[int, list[dict]] = {}
  for line in epath.Path(path).read_text().splitlines():
    row = json.loads(line)
    rows.setdefault(row["index"], []).append(row)
  return {index: sorted(candidates, key=lambda r: r["candidate"]) for index, candidates in sorted(rows.items())}


def best(candidates: Sequence[dict]) -> dict:
  """The candidate with the highest (lbt_score, gold_log_likelihood); ties go to the lowest candidate number."""
  return max(candidates, key=lambda r: (r["lbt_score"], r["gold_log_likelihood"], -r["candidate"]))


def weighted_vote(candidates: Sequence[dict], answers: Sequence[str]) -> tuple[str, dict]:
  """(the answer with the largest sum of LbT scores, the best candidate giving it); ties by the best candidate."""
  totals: dict[str, float] = {}
  for row, answer in zip(candidates, answers):
    totals[answer] = totals.get(answer, 0.0) + row["lbt_score"]
  top = max(totals.values())
  tied = [a for a, total in totals.items() if total == top]
  winner = best([r for r, a in zip(candidates, answers) if a in tied])
  answer = answers[list(candidates).index(winner)]
  return answer, winner


def candidate_answers(config: LbtConfig, scores: dict[int, list[dict]], problems: dict[int, Problem]
                      ) -> dict[tuple[int, int], str]:
  """{(problem, candidate): the letter the teacher ranks highest after the candidate's rationale}."""
  keys = [(index, row["candidate"]) for index, rows in scores.items() for row in rows]
  texts = {(index, row["candidate"]): row["text"] for index, rows in scores.items() for row in rows}
  examples = [evaluate.EvalExample(texts[key].rstrip() + VOTE_SUFFIX, problems[key[0]].letters, 0, str(key))
              for key in keys]
  mesh = partitioning.make_mesh(*config.mesh_shape)
  model, params = convert.load_model(config.teacher[1], mesh=mesh)
  vocabulary = checkpoints.load_vocabulary(checkpoints.resolve(config.teacher[1]))
  score_fn = evaluate.jit_score(model, mesh)
  with partitioning.activation_rules(mesh):
    scored = evaluate.score_examples(examples, lambda *a: score_fn(params, *a), vocabulary, config.batch_size,
                                     config.max_length, desc="vote answers",
                                     row_multiple=partitioning.data_parallel_size(mesh))
  return {key: examples[i].options[int(np.argmax(s))] for i, (key, s) in enumerate(zip(keys, scored))}


def select(config: LbtConfig, selection: str = "max") -> str:
  """Writes OUTPUT_DIR/selected/annotated.jsonl (the chosen candidate per problem, annotation format)."""
  if selection not in SELECTIONS:
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
  scores = read_scores(str(epath.Path(config.output_dir) / "scores.jsonl"))
  candidates = read_candidates(config)
  problems = {p.index: p for p in read_problems(config.input)}
  answers = candidate_answers(config, scores, problems) if selection == "weighted_vote" else {}
  rows = []
  for index, rows_of_problem in scores.items():
    lbt: dict[str, Any] = {"selection": selection, "scores": [r["lbt_score"] for r in rows_of_problem]}
    if selection == "max":
      chosen = best(rows_of_problem)
    else:
      voted, chosen = weighted_vote(rows_of_problem, [answers[(index, r["candidate"])] for r in rows_of_problem])
      lbt.update(voted_answer=voted, agrees_with_gold=voted == problems[index].answer)
    record = dict(candidates[(index, chosen["candidate"])])
    lbt.update(candidate=chosen["candidate"], lbt_score=chosen["lbt_score"],
               gold_log_likelihood=chosen["gold_log_likelihood"])
    record["provenance"] = {**record["provenance"], "lbt": lbt}
    rows.append(record)
  path = epath.Path(config.output_dir) / "selected" / annotation_store.OUTPUT_FILE
  annotation_store.write_jsonl_atomically(path, rows)
  return str(path)


# ----------------------------------------------------------------------------------------------- M2 / M3


def worst(candidates: Sequence[dict]) -> dict:
  return min(candidates, key=lambda r: (r["lbt_score"], r["gold_log_likelihood"], r["candidate"]))


def teacher_prompt(config: LbtConfig, record: dict) -> str:
  """The prompt the teacher continued for an annotated candidate record."""
  original = {k: v for k, v in record.items() if k not in annotation_inputs.OUTPUT_FIELDS}
  return annotation_inputs.sample(config.input, None, original).prompt(config.teacher[0])


def preference_pairs(config: LbtConfig, min_gap: float = 0.0) -> str:
  """OUTPUT_DIR/pairs.jsonl: per problem, the best (chosen) and the worst (rejected) candidate's rationale when
  their LbT scores differ by more than `min_gap`: DPO's training data."""
  candidates, rows = read_candidates(config), []
  for index, scored in read_scores(str(epath.Path(config.output_dir) / "scores.jsonl")).items():
    chosen, rejected = best(scored), worst(scored)
    if chosen["lbt_score"] - rejected["lbt_score"] <= min_gap:
      continue
    prompt = teacher_prompt(config, candidates[(index, chosen["candidate"])])
    if not (chosen["text"].startswith(prompt) and rejected["text"].startswith(prompt)):
      raise ValueError(f"problem {index}: a candidate's text does not start with its teacher prompt {prompt!r}")
    rows.append({"index": index, "prompt": prompt, "chosen": chosen["text"][len(prompt):],
                 "rejected": rejected["text"][len(prompt):], "chosen_score": chosen["lbt_score"],
                 "rejected_score": rejected["lbt_score"]})
  path = epath.Path(config.output_dir) / "pairs.jsonl"
  annotation_store.write_jsonl_atomically(path, rows)
  log.info("LbT: %d preference pairs in %s", len(rows), path)
  return str(path)


def held_out_accuracy(config: LbtConfig, held_out: annotation_inputs.InputSpec) -> float:
  """The students' accuracy on exams drawn from held-out problems, taught with this round's candidates
  (OUTPUT_DIR/scores_held_out.jsonl): whether the rationales help on problems no score was computed on."""
  path = epath.Path(config.output_dir) / "scores_held_out.jsonl"
  if not path.exists():
    problems, pool = read_problems(config.input), read_problems(held_out)
    exams = choose_exams(problems, pool, config.exam_size, "random", config.seed + 1, same_pool=False)
    annotation_store.write_jsonl_atomically(path, score_rows(config, problems, pool, exams))
  scores = [json.loads(line)["lbt_score"] for line in path.read_text().splitlines()]
  return float(np.mean(scores))


def iterate(config: LbtConfig, rounds: int, dpo_settings: dict, held_out: Optional[annotation_inputs.InputSpec],
            min_gap: float = 0.0) -> list[dict]:
  """M3-style loop: per round, annotate (K candidates) -> LbT scores -> DPO of the teacher on the preference
  pairs; the next round's teacher is this round's DPO result. Writes OUTPUT_DIR/rounds.json."""
  from teacherlm_jax import dpo
  kind, teacher = config.teacher
  history = []
  for number in range(rounds):
    round_config = dataclasses.replace(config, teacher=(kind, teacher),
                                       output_dir=str(epath.Path(config.output_dir) / f"round_{number}"))
    scores_path = score(round_config)
    mean_score = float(np.mean([json.loads(line)["lbt_score"]
                                for line in epath.Path(scores_path).read_text().splitlines()]))
    entry = {"round": number, "teacher": teacher, "mean_lbt_score": mean_score,
             "held_out_accuracy": held_out_accuracy(round_config, held_out) if held_out else None}
    pairs = preference_pairs(round_config, min_gap)
    if epath.Path(pairs).read_text().strip():
      model_dir = str(epath.Path(round_config.output_dir) / "dpo")
      entry["dpo"] = dpo.run(dpo.DpoConfig(pairs=pairs, initial_checkpoint_path=teacher, model_dir=model_dir,
                                           mesh_shape=config.mesh_shape, **dpo_settings))
      teacher = model_dir
    else:
      log.warning("LbT round %d: every problem's candidates scored alike; no pairs, the teacher is kept", number)
    log.info("LbT round %d: mean LbT score %.4f, held-out accuracy %s", number, mean_score,
             entry["held_out_accuracy"])
    history.append(entry)
  if jax.process_index() == 0:
    (epath.Path(config.output_dir) / "rounds.json").write_text(json.dumps(history, indent=2))
  return history


# ----------------------------------------------------------------------------------------------- entry points


@gin.configurable
def lbt_config(*, input: str, output_dir: str, teacher: Sequence[str], students: Sequence[str],
               exam_input: Optional[str] = None, **settings: Any) -> LbtConfig:
  """An LbtConfig from gin (gin/runs/lbt.gin); `settings` are LbtConfig's other fields."""
  spec = annotation_inputs.InputSpec(input)
  exam = annotation_inputs.InputSpec(exam_input) if exam_input else None
  if "mesh_shape" in settings:
    settings["mesh_shape"] = tuple(settings["mesh_shape"])
  return LbtConfig(input=spec, output_dir=output_dir, teacher=tuple(teacher), students=tuple(students),
                   exam_input=exam, **settings)


@gin.configurable
def score_command() -> str:
  """`lbt score`: M1 scoring with the gin-configured LbtConfig; returns the path of scores.jsonl."""
  return score(gin.get_configurable(lbt_config)())


@gin.configurable
def select_command(selection: str = "max") -> str:
  """`lbt select`: the selected dataset with the gin-configured LbtConfig; returns its path."""
  return select(gin.get_configurable(lbt_config)(), selection)


@gin.configurable
def pairs_command(min_gap: float = 0.0) -> str:
  """`lbt pairs`: DPO preference pairs from the scores; returns the path of pairs.jsonl."""
  return preference_pairs(gin.get_configurable(lbt_config)(), min_gap)


@gin.configurable
def iterate_command(rounds: int = 2, held_out: Optional[str] = None, dpo_settings: Optional[dict] = None,
                    min_gap: float = 0.0) -> list[dict]:
  """`lbt iterate`: ROUNDS rounds of annotate -> score -> DPO; returns the per-round log."""
  spec = annotation_inputs.InputSpec(held_out) if held_out else None
  return iterate(gin.get_configurable(lbt_config)(), rounds, dict(dpo_settings or {}), spec, min_gap)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = list(sys.argv[1:] if argv is None else argv)
  commands = {"score": score_command, "select": select_command, "pairs": pairs_command, "iterate": iterate_command}
  if not args or args[0] not in commands:
    print("usage: python -m teacherlm_jax.lbt {score,select,pairs,iterate} --gin_file=gin/runs/lbt.gin --gin.NAME=VALUE ...",
          file=sys.stderr)
    return 2
  return shell.run_entry_point(commands[args[0]], args[1:], print)


if __name__ == "__main__":
  from teacherlm_jax import lbt as lbt_module
  sys.exit(lbt_module.main())
