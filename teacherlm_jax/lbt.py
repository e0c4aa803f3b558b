"""Learning by teaching (LbT; Ning et al. 2024, "Can LLMs Learn by Teaching?"): M1, M2 and M3 for our teachers.

  python -m teacherlm_jax.lbt {score,select,report,pairs,m2,refine,iterate_dpo} --gin_file=gin/runs/lbt.gin \\
      --gin.INPUT="'problems.jsonl'" --gin.OUTPUT_DIR="'/tmp/lbt'" --gin.TEACHER="'/runs/stage3_cot'" \\
      --gin.STUDENTS="['/runs/student']"

**M1 (`score`): answers without the gold label.** The teacher solves each teaching problem (TP) with the solver
prompt (`solver_prompt`, default `Q: {question} A: Let's think step by step.`: the answer withheld, so released
TeacherLM / BLOOMZ checkpoints work as solvers), K times from one prefill (an annotation run with `num_samples=K`,
`teacherlm_jax.annotate` + the slot engine), plus once greedily. Each solution's answer TA is the option the
teacher ranks highest after `{solution} So the answer is (`. A candidate's worked example is
`{solution} So the answer is ({TA}).`; its students take an exam of similar problems (EPs, labels known;
`lbt_exams`), each exam prompt being the worked example followed by the EP: `student_mode='rank'`:
` Q: {EP} A: The answer is (` and rank classification; `'generate'` (as in the paper): ` {solver prompt of EP}`,
the student's own greedy rationale, then rank classification after ` So the answer is (`. The E exam prompts of a
candidate share its worked example, which is encoded once (`evaluate.score_shared_examples`). Scores per candidate:
each student's exam accuracy, their mean (`lbt_score`), the mean gold-answer log-likelihood (the tie-breaker), and
the **no-rationale control**: the same exam after `Q: {TP} A: The answer is ({TA}).` (the worked example without
its rationale); `lbt_gain = lbt_score - control` says what the rationale taught beyond the letter. The TP's gold
letter is never read by scoring or selection.

**Selection** (`select`, `lbt_selection`): greedy, self_consistency, lbt_max, lbt_sum, lbt_mean choose an answer per
TP; `select` writes the chosen candidates in the annotation output format (`selected/annotated.jsonl`,
`provenance.lbt`); `report` scores every method against the TPs' gold (evaluation only: the one place M1 reads it)
for each student alone and for all together (`selection_report.json`, `.md`).

**M2** (`pairs`, `m2`): DPO preference pairs from the scores by `pairs_from` = correctness (reads the TP gold),
lbt, or correctness+lbt; `m2` runs, in one command, the teacher's greedy solver accuracy on held-out problems
before, then per pairing mode pairs -> DPO (`teacherlm_jax.dpo`) -> the DPO'd teacher's held-out accuracy
(`m2/m2.json`).

**M3** (`refine`): a k-exemplar few-shot prompt for the task is refined round by round without weight updates:
students taught with each exemplar take exams; the exemplar whose students fail most is replaced by the best
LbT-scored candidate from a pool the teacher samples for the EPs those students failed (few-shot prompted with the
other exemplars), if that candidate scores higher. Per round the teacher's few-shot accuracy on held-out problems
and the students' exam accuracy are logged (`m3/m3.json`). `iterate_dpo` is the other loop: rounds of
score -> pairs -> DPO, each round's teacher the previous round's DPO result (`rounds.json`).

Layout of OUTPUT_DIR (every stage is skipped when its file exists, so an interrupted run resumes; the annotation
runs resume per chunk):
  candidates/ greedy/   annotation runs (K samples; one greedy solution) of the solver prompt
  answers.jsonl         {"run": "sampled" | "greedy", "index", "candidate", "answer"}: each solution's TA
  exams.jsonl           {"index", "exam": [EP indices]}
  scores.jsonl          per (TP, candidate): rationale, answer, text (the worked example), per-student accuracy /
                        gold log-likelihood / control, lbt_score, gold_log_likelihood, control, lbt_gain, exam
Cost per TP: K + 1 generations, K + 1 teacher answer scorings, and per student (K + distinct TAs) x E exam
prompts, each pair of a worked example and E questions one prefix encoding plus E question encodings
(`generate` mode adds E x K student generations).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Callable, Iterable, Optional, Sequence

import gin
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from tasks import rendering
from teacherlm_jax import (annotate, annotation_inputs, annotation_store, checkpoints, convert, decoding, engine,
                           evaluate, lbt_exams, lbt_selection, partitioning, shell, vocabularies)
from teacherlm_jax.lbt_exams import Problem, read_problems

log = shell.log
SOLVER_PROMPT = "Q: {question} A: Let's think step by step."
ANSWER_SUFFIX = " So the answer is ("
STUDENT_MODES = ("rank", "generate")


@dataclasses.dataclass(frozen=True)
class LbtConfig:
  """An LbT run (see the module docstring).

  Attributes:
    input: the teaching problems; exam_input: the exam pool (None: the teaching problems themselves).
    output_dir: where solutions, answers, exams and scores go.
    teacher: the solver checkpoint; students: student checkpoints.
    num_candidates (K), exam_size (E), exam_strategy ('random' | 'tfidf' | 'embedding'), embedding_checkpoint
      (embedding: whose hidden states; None = the teacher).
    solver_prompt: a format over {question}; student_mode: 'rank' or 'generate' (student_max_new_tokens each).
    max_new_tokens, temperature, top_k, top_p, stop_strings, seed, max_input_length: the teacher's sampling.
    batch_size, max_length: scoring batches and the longest exam prompt (a worked example keeps its end).
  """

  input: annotation_inputs.InputSpec
  output_dir: str
  teacher: str
  students: tuple[str, ...]
  exam_input: Optional[annotation_inputs.InputSpec] = None
  num_candidates: int = 4
  exam_size: int = 4
  exam_strategy: str = "random"
  embedding_checkpoint: Optional[str] = None
  solver_prompt: str = SOLVER_PROMPT
  student_mode: str = "rank"
  student_max_new_tokens: int = 64
  max_new_tokens: int = 128
  temperature: float = 1.0
  top_k: int = 50
  top_p: float = 1.0
  stop_strings: tuple[str, ...] = (" Q:",)
  seed: int = 0
  max_input_length: int = 512
  batch_size: int = 32
  max_length: int = 2048
  mesh_shape: tuple[int, int, int] = (1, -1, 1)

  def __post_init__(self):
    if self.exam_strategy not in lbt_exams.STRATEGIES:
      raise ValueError(f"exam_strategy must be one of {lbt_exams.STRATEGIES}, got {self.exam_strategy!r}")
    if self.student_mode not in STUDENT_MODES:
      raise ValueError(f"student_mode must be one of {STUDENT_MODES}, got {self.student_mode!r}")
    if self.num_candidates < 1 or self.exam_size < 1 or not self.students:
      raise ValueError("num_candidates and exam_size must be positive, and at least one student is needed")
    if "{question}" not in self.solver_prompt:
      raise ValueError(f"solver_prompt {self.solver_prompt!r} has no {{question}} field")


# ----------------------------------------------------------------------------------------------- texts


def solver_text(config: LbtConfig, question: str, prefix: str = "") -> str:
  """The solver prompt of a question (after a few-shot `prefix`), with the release's space rule, as annotated."""
  return rendering.remove_duplicated_block(prefix + config.solver_prompt.format(question=question))


def solution_text(config: LbtConfig, question: str, record: dict) -> str:
  """A solution without any few-shot prefix: the solver prompt and the rationale (the record's `cot`)."""
  rationale = record["cot"]
  return solver_text(config, question) + (f" {rationale}" if rationale else "")


def worked_example(solution: str, answer: str) -> str:
  """`{solution} So the answer is ({answer}).`: a solution (prompt + rationale) with its answer, as taught."""
  return f"{solution.rstrip()}{ANSWER_SUFFIX}{answer})."


def control_example(question: str, answer: str) -> str:
  """The worked example without its rationale: `Q: {question} A: The answer is ({answer}).`"""
  return rendering.rendered_sample(question, f"({answer})")


def _escaped(text: str) -> str:
  return text.replace("{", "{{").replace("}", "}}")


# ----------------------------------------------------------------------------------------------- stages


def _stage(path: epath.Path, make: Callable[[], Iterable[dict]]) -> list[dict]:
  """The rows of a stage file, made (on every process: the scoring is collective) and written by process 0 once."""
  if not path.exists():
    rows = list(make())
    if jax.process_index() == 0:
      annotation_store.write_jsonl_atomically(path, rows)
    multihost_utils.sync_global_devices(f"lbt_{path.name}")
  return [json.loads(line) for line in path.read_text().splitlines()]


def solver_config(config: LbtConfig, spec: annotation_inputs.InputSpec, output_dir: str, checkpoint: str,
                  num_samples: int, prefix: str = "") -> annotate.AnnotationConfig:
  """An annotation run of the solver prompt: K samples, or one greedy solution when num_samples is 1."""
  sampled = num_samples > 1
  return annotate.AnnotationConfig(
      input=spec, output_dir=output_dir, teachers=(("cot", checkpoint),), max_input_length=config.max_input_length,
      max_new_tokens=config.max_new_tokens, temperature=config.temperature if sampled else 0.0,
      top_k=config.top_k if sampled else 0, top_p=config.top_p if sampled else 1.0,
      stop_strings=config.stop_strings, seed=config.seed, batch_size=config.batch_size,
      mesh_shape=config.mesh_shape, num_samples=num_samples,
      prompt_format=_escaped(prefix) + config.solver_prompt)


def solve(config: LbtConfig, spec: annotation_inputs.InputSpec, output_dir: str, checkpoint: str,
          num_samples: int, prefix: str = "") -> dict[tuple[int, int], dict]:
  """{(input index, sample k): solution record} of an annotation run of the solver prompt (resumed if begun)."""
  annotate.run(solver_config(config, spec, output_dir, checkpoint, num_samples, prefix))
  return _records(epath.Path(output_dir))


def _records(directory: epath.Path) -> dict[tuple[int, int], dict]:
  """{(input index, sample k): record} of a finished annotation run."""
  records = {}
  for line in (directory / annotation_store.OUTPUT_FILE).read_text().splitlines():
    record = json.loads(line)
    records[(record["provenance"]["index"], record["provenance"].get("sample", 0))] = record
  return records


def _mesh(config: LbtConfig) -> jax.sharding.Mesh:
  return partitioning.make_mesh(*config.mesh_shape)


def _model(checkpoint: str, mesh: jax.sharding.Mesh, scan_layers: Optional[bool] = None):
  """(model, params, vocabulary) of a checkpoint; a checkpoint without a vocabulary is an error naming it."""
  model, params = convert.load_model(checkpoint, mesh=mesh, scan_layers=scan_layers)
  vocabulary = checkpoints.load_vocabulary(checkpoints.resolve(checkpoint))
  if vocabulary is None:
    raise FileNotFoundError(f"{checkpoint} records no vocabulary (vocabulary.json / tokenizer.json)")
  return model, params, vocabulary


def teacher_answers(config: LbtConfig, checkpoint: str, texts: Sequence[str], letters: Sequence[Sequence[str]],
                    mesh: jax.sharding.Mesh) -> list[str]:
  """The option each solution leads to: the teacher's highest-ranked letter after `{text} So the answer is (`."""
  examples = [evaluate.EvalExample(text.rstrip() + ANSWER_SUFFIX, tuple(options), 0, str(i))
              for i, (text, options) in enumerate(zip(texts, letters))]
  model, params, vocabulary = _model(checkpoint, mesh)
  score = evaluate.jit_score(model, mesh)
  with partitioning.activation_rules(mesh):
    scores = evaluate.score_examples(examples, lambda *a: score(params, *a), vocabulary, config.batch_size,
                                     config.max_length, desc="teacher answers",
                                     row_multiple=partitioning.data_parallel_size(mesh))
  return [e.options[int(np.argmax(s))] for e, s in zip(examples, scores)]


def answer_rows(config: LbtConfig, runs: dict[str, dict[tuple[int, int], dict]], problems: dict[int, Problem],
                checkpoint: str, mesh: jax.sharding.Mesh) -> list[dict]:
  """answers.jsonl: the TA of every solution of every run."""
  keys = [(run, index, k) for run, solutions in runs.items() for index, k in sorted(solutions) if index in problems]
  texts = [runs[run][(index, k)]["all"] for run, index, k in keys]
  answers = teacher_answers(config, checkpoint, texts, [problems[index].letters for _, index, _ in keys], mesh)
  return [{"run": run, "index": index, "candidate": k, "answer": answer}
          for (run, index, k), answer in zip(keys, answers)]


# ----------------------------------------------------------------------------------------------- exams


def exam_questions(config: LbtConfig, exam: Sequence[Problem]) -> list[str]:
  """What follows the worked example in each exam prompt (rank mode's context; generate mode's prompt)."""
  if config.student_mode == "rank":
    return [" " + rendering.eval_context(p.question) for p in exam]
  return [" " + solver_text(config, p.question) for p in exam]


def student_generations(config: LbtConfig, checkpoint: str, prompts: Sequence[str], mesh: jax.sharding.Mesh
                        ) -> list[str]:
  """Each prompt's greedy continuation by the student (the slot engine), cut at the first stop string."""
  model, params, vocabulary = _model(checkpoint, mesh, scan_layers=False)
  stop = decoding.DecodingConfig(
      max_new_tokens=config.student_max_new_tokens, eos_id=vocabulary.eos_id, pad_id=vocabulary.pad_id,
      stop_sequences=tuple(tuple(vocabulary.encode(s)) for s in config.stop_strings))
  rows = [vocabularies.keep_last(vocabulary, vocabularies.encode_prompt(vocabulary, p), config.max_length)
          for p in prompts]
  slots = engine.Engine(model, params, stop, slots=config.batch_size, max_prompt_length=config.max_length,
                        seed=config.seed, mesh=mesh)
  texts = [""] * len(prompts)
  with partitioning.activation_rules(mesh):
    for finished in slots.run(engine.Request(i, ids, i) for i, ids in enumerate(rows)):
      ids = [int(t) for t in finished.ids if int(t) != vocabulary.eos_id]
      texts[finished.key] = decoding.cut_at_stop_strings(vocabulary.decode(ids), config.stop_strings)[0]
  return texts


def student_exam(config: LbtConfig, student: str, prefixes: Sequence[str], exams: Sequence[Sequence[Problem]],
                 mesh: jax.sharding.Mesh) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """(correct [E_i], gold log-likelihood [E_i]) per prefix: one student taught with each prefix takes its exam."""
  questions = [exam_questions(config, exam) for exam in exams]
  if config.student_mode == "generate":
    flat = [(i, j) for i, exam in enumerate(exams) for j in range(len(exam))]
    generated = student_generations(config, student, [prefixes[i] + questions[i][j] for i, j in flat], mesh)
    for (i, j), text in zip(flat, generated):
      questions[i][j] = f"{questions[i][j]}{text.rstrip()}{ANSWER_SUFFIX}"
  examples = [[evaluate.EvalExample(question, p.letters, p.letters.index(p.answer), str(p.index))
               for question, p in zip(row, exam)] for row, exam in zip(questions, exams)]
  model, params, vocabulary = _model(student, mesh)
  shared = evaluate.jit_score_shared(model, mesh)
  with partitioning.activation_rules(mesh):
    scores = evaluate.score_shared_examples(prefixes, examples, lambda *a: shared(params, *a), vocabulary,
                                            config.batch_size, config.max_length,
                                            desc=f"exam {epath.Path(student).name}",
                                            row_multiple=partitioning.data_parallel_size(mesh))
  correct = [np.asarray([int(np.argmax(s)) == e.target for e, s in zip(row, got)], np.float32)
             for row, got in zip(examples, scores)]
  gold = [np.asarray([s[e.target] for e, s in zip(row, got)], np.float64) for row, got in zip(examples, scores)]
  return correct, gold


def exam_results(config: LbtConfig, prefixes: Sequence[str], exams: Sequence[Sequence[Problem]],
                 mesh: jax.sharding.Mesh) -> list[dict[str, dict]]:
  """Per prefix: {student: {"accuracy", "gold_log_likelihood", "correct": per exam problem}}."""
  results: list[dict[str, dict]] = [{} for _ in prefixes]
  for student in config.students:
    correct, gold = student_exam(config, student, prefixes, exams, mesh)
    for row, (c, g) in enumerate(zip(correct, gold)):
      results[row][student] = {"accuracy": float(c.mean()), "gold_log_likelihood": float(g.mean()),
                               "correct": [int(x) for x in c]}
  return results


def choose_exams(config: LbtConfig, problems: Sequence[Problem], pool: Sequence[Problem], same_pool: bool,
                 seed: int, mesh: jax.sharding.Mesh) -> dict[int, list[int]]:
  vectors = lbt_exams.exam_vectors(problems, pool, config.exam_strategy,
                                   config.embedding_checkpoint or config.teacher, config.batch_size,
                                   config.max_length, mesh)
  return lbt_exams.choose_exams(problems, pool, config.exam_size, config.exam_strategy, seed, same_pool, vectors)


# ----------------------------------------------------------------------------------------------- M1 scoring


def score_rows(config: LbtConfig, problems: dict[int, Problem], pool: dict[int, Problem],
               exams: dict[int, list[int]], solutions: dict[tuple[int, int], dict], answers: dict[tuple[int, int], str],
               mesh: jax.sharding.Mesh) -> list[dict]:
  """One row per (TP, candidate) with its LbT score, control and gain (no TP gold read)."""
  keys = sorted(key for key in solutions if key[0] in exams)
  controls = sorted({(index, answers[(index, k)]) for index, k in keys})
  prefixes = ([worked_example(solution_text(config, problems[key[0]].question, solutions[key]), answers[key])
               for key in keys]
              + [control_example(problems[index].question, answer) for index, answer in controls])
  exam_of = [exams[index] for index, _ in keys] + [exams[index] for index, _ in controls]
  log.info("LbT: %d candidates + %d controls x %d exam problems x %d students", len(keys), len(controls),
           config.exam_size, len(config.students))
  results = exam_results(config, prefixes, [[pool[j] for j in exam] for exam in exam_of], mesh)
  control_of = {key: results[len(keys) + i] for i, key in enumerate(controls)}
  rows = []
  for row, (index, k) in enumerate(keys):
    control = control_of[(index, answers[(index, k)])]
    students = {s: {"accuracy": results[row][s]["accuracy"], "gold_log_likelihood":
                    results[row][s]["gold_log_likelihood"], "control": control[s]["accuracy"]}
                for s in config.students}
    rows.append({"index": index, "candidate": k, "rationale": solutions[(index, k)]["cot"],
                 "answer": answers[(index, k)], "text": prefixes[row], "exam": exams[index], "students": students,
                 **summary(students)})
  return rows


def summary(students: dict[str, dict]) -> dict[str, float]:
  """lbt_score, gold_log_likelihood, control (means over the given students) and lbt_gain = score - control."""
  mean = {name: float(np.mean([s[name] for s in students.values()]))
          for name in ("accuracy", "gold_log_likelihood", "control")}
  return {"lbt_score": mean["accuracy"], "gold_log_likelihood": mean["gold_log_likelihood"],
          "control": mean["control"], "lbt_gain": mean["accuracy"] - mean["control"]}


def score(config: LbtConfig) -> str:
  """M1: solutions, answers, exams and LbT scores (each stage skipped when done); returns scores.jsonl's path."""
  out = epath.Path(config.output_dir)
  runs = {"sampled": solve(config, config.input, str(out / "candidates"), config.teacher, config.num_candidates),
          "greedy": solve(config, config.input, str(out / "greedy"), config.teacher, 1)}
  problems = {p.index: p for p in read_problems(config.input)}
  pool = {p.index: p for p in read_problems(config.exam_input)} if config.exam_input else problems
  mesh = _mesh(config)
  answers = _stage(out / "answers.jsonl", lambda: answer_rows(config, runs, problems, config.teacher, mesh))
  sampled = {(r["index"], r["candidate"]): r["answer"] for r in answers if r["run"] == "sampled"}
  exam_rows = _stage(out / "exams.jsonl", lambda: (
      {"index": i, "exam": e} for i, e in choose_exams(config, list(problems.values()), list(pool.values()),
                                                       config.exam_input is None, config.seed, mesh).items()))
  exams = {row["index"]: row["exam"] for row in exam_rows}
  _stage(out / "scores.jsonl", lambda: score_rows(config, problems, pool, exams, runs["sampled"], sampled, mesh))
  return str(out / "scores.jsonl")


# ----------------------------------------------------------------------------------------------- selection


def read_scores(config: LbtConfig, students: Optional[Sequence[str]] = None) -> dict[int, list[dict]]:
  """{TP index: its candidates' score rows}; with `students`, the scores as that subset of students gave them."""
  rows: dict[int, list[dict]] = {}
  for line in (epath.Path(config.output_dir) / "scores.jsonl").read_text().splitlines():
    row = json.loads(line)
    if students is not None:
      row = {**row, **summary({s: row["students"][s] for s in students})}
    rows.setdefault(row["index"], []).append(row)
  return {index: sorted(group, key=lambda r: r["candidate"]) for index, group in sorted(rows.items())}


def greedy_answers(config: LbtConfig) -> dict[int, str]:
  rows = (json.loads(line) for line in (epath.Path(config.output_dir) / "answers.jsonl").read_text().splitlines())
  return {row["index"]: row["answer"] for row in rows if row["run"] == "greedy"}


def selections(config: LbtConfig, method: str, students: Optional[Sequence[str]] = None) -> dict[int, str]:
  """{TP index: the answer `method` chooses} (no TP gold read)."""
  greedy = greedy_answers(config)
  return {index: lbt_selection.choose(method, rows, greedy.get(index))
          for index, rows in read_scores(config, students).items()}


def select(config: LbtConfig, method: str = "lbt_sum") -> str:
  """Writes OUTPUT_DIR/selected/annotated.jsonl: per TP the candidate kept for the chosen answer (annotation
  format; `greedy`: the greedy solution), `provenance.lbt` saying which and why."""
  out = epath.Path(config.output_dir)
  chosen = selections(config, method)
  candidates, greedy = _records(out / "candidates"), _records(out / "greedy")
  rows = []
  for index, group in read_scores(config).items():
    lbt = {"selection": method, "answer": chosen[index], "scores": [r["lbt_score"] for r in group],
           "answers": [r["answer"] for r in group]}
    if method == "greedy":
      record, lbt["candidate"] = dict(greedy[(index, 0)]), "greedy"
    else:
      kept = lbt_selection.representative(method, group, chosen[index])
      record = dict(candidates[(index, kept["candidate"])])
      lbt.update(candidate=kept["candidate"], lbt_score=kept["lbt_score"], lbt_gain=kept["lbt_gain"],
                 gold_log_likelihood=kept["gold_log_likelihood"])
    record["provenance"] = {**record["provenance"], "lbt": lbt}
    rows.append(record)
  path = out / "selected" / annotation_store.OUTPUT_FILE
  if jax.process_index() == 0:
    annotation_store.write_jsonl_atomically(path, rows)
  return str(path)


def selection_report(config: LbtConfig) -> dict[str, Any]:
  """Each method's accuracy against the TPs' gold letters (evaluation only: this reads the gold), per student
  alone and for all students; written to OUTPUT_DIR/selection_report.{json,md}."""
  gold = {p.index: p.answer for p in read_problems(config.input)}
  sets = {"all students": list(config.students)}
  if len(config.students) > 1:
    sets.update({student: [student] for student in config.students})
  report: dict[str, Any] = {"gold": "read for this report only", "problems": 0, "student_sets": {}}
  for name, students in sets.items():
    per_method = {}
    for method in lbt_selection.METHODS:
      chosen = selections(config, method, students)
      per_method[method] = float(np.mean([chosen[i] == gold[i] for i in chosen]))
      report["problems"] = len(chosen)
    rows = [r for group in read_scores(config, students).values() for r in group]
    per_method["mean_lbt_score"] = float(np.mean([r["lbt_score"] for r in rows]))
    per_method["mean_lbt_gain"] = float(np.mean([r["lbt_gain"] for r in rows]))
    report["student_sets"][name] = per_method
  out = epath.Path(config.output_dir)
  if jax.process_index() == 0:
    (out / "selection_report.json").write_text(json.dumps(report, indent=2))
    (out / "selection_report.md").write_text(report_markdown(report))
  return report


def report_markdown(report: dict[str, Any]) -> str:
  columns = list(lbt_selection.METHODS) + ["mean_lbt_score", "mean_lbt_gain"]
  lines = [f"LbT answer selection on {report['problems']} teaching problems (accuracy against their gold letters)",
           "", "| students | " + " | ".join(columns) + " |", "| --- " * (len(columns) + 1) + "|"]
  for name, values in report["student_sets"].items():
    lines.append(f"| {name} | " + " | ".join(f"{values[c]:.4f}" for c in columns) + " |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- M2


def pair_rows(config: LbtConfig, pairs_from: str, min_gap: float = 0.0, max_pairs: int = 4) -> list[dict]:
  """DPO rows {"prompt", "chosen", "rejected", ...}: the solver prompt, and two candidates' rationale + answer
  (`pairs_from` 'correctness' and 'correctness+lbt' read the TPs' gold letters)."""
  problems = {p.index: p for p in read_problems(config.input)}
  rows = []
  for index, group in read_scores(config).items():
    prompt = solver_text(config, problems[index].question)
    gold = problems[index].answer if pairs_from != "lbt" else None  # read only by the correctness pairings
    for chosen, rejected in lbt_selection.preference_pairs(group, pairs_from, gold, min_gap, max_pairs):
      if not (chosen["text"].startswith(prompt) and rejected["text"].startswith(prompt)):
        raise ValueError(f"problem {index}: a worked example does not start with its solver prompt {prompt!r}")
      rows.append({"index": index, "pairs_from": pairs_from, "prompt": prompt,
                   "chosen": chosen["text"][len(prompt):], "rejected": rejected["text"][len(prompt):],
                   "chosen_candidate": chosen["candidate"], "rejected_candidate": rejected["candidate"],
                   "chosen_score": chosen["lbt_score"], "rejected_score": rejected["lbt_score"]})
  return rows


def preference_pairs(config: LbtConfig, pairs_from: str = "correctness+lbt", min_gap: float = 0.0,
                     max_pairs: int = 4, path: Optional[str] = None) -> str:
  """Writes the pairs (default OUTPUT_DIR/pairs.jsonl) and returns the path."""
  target = epath.Path(path) if path else epath.Path(config.output_dir) / "pairs.jsonl"
  rows = pair_rows(config, pairs_from, min_gap, max_pairs)
  if jax.process_index() == 0:
    annotation_store.write_jsonl_atomically(target, rows)
  multihost_utils.sync_global_devices("lbt_pairs")
  log.info("LbT: %d %s preference pairs in %s", len(rows), pairs_from, target)
  return str(target)


def solver_accuracy(config: LbtConfig, checkpoint: str, spec: annotation_inputs.InputSpec, output_dir: str,
                    prefix: str = "") -> float:
  """The checkpoint's greedy accuracy as a solver (after a few-shot `prefix`) on `spec`'s problems, their gold
  letters read (evaluation); OUTPUT_DIR/accuracy.json keeps the answers."""
  path = epath.Path(output_dir) / "accuracy.json"
  if not path.exists():
    solutions = solve(config, spec, output_dir, checkpoint, 1, prefix)
    problems = {p.index: p for p in read_problems(spec)}
    keys = sorted(key for key in solutions if key[0] in problems)
    answers = teacher_answers(config, checkpoint, [solutions[k]["all"] for k in keys],
                              [problems[i].letters for i, _ in keys], _mesh(config))
    hits = [answer == problems[i].answer for (i, _), answer in zip(keys, answers)]
    result = {"checkpoint": checkpoint, "accuracy": float(np.mean(hits)), "problems": len(hits),
              "answers": answers, "prefix": prefix}
    if jax.process_index() == 0:
      path.write_text(json.dumps(result, indent=2))
    multihost_utils.sync_global_devices("lbt_solver_accuracy")
  return json.loads(path.read_text())["accuracy"]


def dpo_teacher(config: LbtConfig, pairs: str, teacher: str, model_dir: str, dpo_settings: dict) -> dict:
  """DPO of `teacher` on `pairs` into `model_dir` (`teacherlm_jax.dpo`); returns its last metrics."""
  from teacherlm_jax import dpo, trainer  # DPO trains; scoring and selection never import the training loop
  settings = dict(dpo_settings)
  optimizer = trainer.OptimizerConfig(
      learning_rate=settings.pop("learning_rate", 1e-6), warmup_steps=settings.pop("warmup_steps", 0),
      decay=settings.pop("decay", "constant"), total_steps=settings.get("train_steps", 100))
  return dpo.run(dpo.DpoConfig(pairs=pairs, initial_checkpoint_path=teacher, model_dir=model_dir,
                               mesh_shape=config.mesh_shape, optimizer=optimizer, **settings))


def m2(config: LbtConfig, held_out: annotation_inputs.InputSpec, pairings: Sequence[str], dpo_settings: dict,
       min_gap: float = 0.0, max_pairs: int = 4) -> dict[str, Any]:
  """M2 in one command: held-out solver accuracy before, then per pairing mode pairs -> DPO -> accuracy after
  (OUTPUT_DIR/m2/m2.json)."""
  score(config)
  out = epath.Path(config.output_dir) / "m2"
  result: dict[str, Any] = {"teacher": config.teacher,
                            "before": solver_accuracy(config, config.teacher, held_out, str(out / "before")),
                            "pairings": {}}
  for pairing in pairings:
    directory = out / pairing
    pairs = preference_pairs(config, pairing, min_gap, max_pairs, str(directory / "pairs.jsonl"))
    entry: dict[str, Any] = {"pairs": len(epath.Path(pairs).read_text().splitlines())}
    if entry["pairs"]:
      entry["dpo"] = dpo_teacher(config, pairs, config.teacher, str(directory / "dpo"), dpo_settings)
      entry["after"] = solver_accuracy(config, str(directory / "dpo"), held_out, str(directory / "held_out"))
    else:
      log.warning("LbT M2 %s: no preference pairs; the teacher is unchanged", pairing)
      entry["after"] = result["before"]
    log.info("LbT M2 %s: %d pairs, held-out accuracy %.4f -> %.4f", pairing, entry["pairs"], result["before"],
             entry["after"])
    result["pairings"][pairing] = entry
  if jax.process_index() == 0:
    (out / "m2.json").write_text(json.dumps(result, indent=2))
  return result


# ----------------------------------------------------------------------------------------------- M3


def initial_exemplars(config: LbtConfig, num_exemplars: int) -> list[dict]:
  """The first `num_exemplars` TPs' greedy solutions with their answers (M1's `greedy/` run)."""
  problems = read_problems(config.input)[:num_exemplars]
  greedy = solve(config, config.input, str(epath.Path(config.output_dir) / "greedy"), config.teacher, 1)
  answers = teacher_answers(config, config.teacher, [greedy[(p.index, 0)]["all"] for p in problems],
                            [p.letters for p in problems], _mesh(config))
  return [{"question": p.question, "task": p.task, "answer": answer, "source": f"input {p.index}",
           "text": worked_example(solution_text(config, p.question, greedy[(p.index, 0)]), answer)}
          for p, answer in zip(problems, answers)]


def examine_exemplars(config: LbtConfig, exemplars: Sequence[dict], pool: Sequence[Problem], seed: int,
                      mesh: jax.sharding.Mesh) -> list[dict]:
  """Per exemplar: its exam, the students' mean accuracy and the exam problems they failed (mean correct < 0.5)."""
  as_problems = [Problem(i, e["question"], (), "", e["task"]) for i, e in enumerate(exemplars)]
  exams = choose_exams(config, as_problems, pool, False, seed, mesh)
  by_index = {p.index: p for p in pool}
  exam_lists = [[by_index[j] for j in exams[p.index]] for p in as_problems]
  results = exam_results(config, [e["text"] for e in exemplars], exam_lists, mesh)
  graded = []
  for exam, result in zip(exam_lists, results):
    correct = np.mean([result[s]["correct"] for s in config.students], axis=0)
    graded.append({"exam": [p.index for p in exam], "accuracy": float(correct.mean()),
                   "failed": [p.index for p, c in zip(exam, correct) if c < 0.5]})
  return graded


def replacement(config: LbtConfig, exemplars: Sequence[dict], position: int, failed: Sequence[Problem],
                pool: Sequence[Problem], directory: epath.Path, mesh: jax.sharding.Mesh) -> Optional[dict]:
  """The best LbT-scored candidate the teacher samples for the failed exam problems, few-shot prompted with the
  other exemplars (None when it samples nothing)."""
  spec = annotation_inputs.InputSpec(str(directory / "failed.jsonl"))
  if not (directory / "failed.jsonl").exists() and jax.process_index() == 0:
    annotation_store.write_jsonl_atomically(directory / "failed.jsonl", map(lbt_exams.problem_record, failed))
  multihost_utils.sync_global_devices("lbt_m3_failed")
  prefix = "".join(e["text"] + " " for i, e in enumerate(exemplars) if i != position)
  solutions = solve(config, spec, str(directory / "pool"), config.teacher, config.num_candidates, prefix)
  keys = sorted(solutions)
  answers = teacher_answers(config, config.teacher, [solutions[k]["all"] for k in keys],
                            [failed[i].letters for i, _ in keys], mesh)
  texts = [worked_example(solution_text(config, failed[k[0]].question, solutions[k]), a)
           for k, a in zip(keys, answers)]
  exams = choose_exams(config, list(failed), pool, True, config.seed, mesh)
  by_index = {p.index: p for p in pool}
  results = exam_results(config, texts, [[by_index[j] for j in exams[failed[i].index]] for i, _ in keys], mesh)
  scored = [{"candidate": n, "answer": a,
             "lbt_score": float(np.mean([r[s]["accuracy"] for s in config.students])),
             "gold_log_likelihood": float(np.mean([r[s]["gold_log_likelihood"] for s in config.students]))}
            for n, (a, r) in enumerate(zip(answers, results))]
  if not scored:
    return None
  top = lbt_selection.best(scored)
  problem = failed[keys[top["candidate"]][0]]
  return {"question": problem.question, "task": problem.task, "answer": top["answer"],
          "text": texts[top["candidate"]], "source": f"exam problem {problem.index}", "lbt_score": top["lbt_score"]}


def refine(config: LbtConfig, held_out: annotation_inputs.InputSpec, num_exemplars: int = 4, rounds: int = 2,
           exemplars: Optional[Sequence[dict]] = None) -> list[dict]:
  """M3: `rounds` rounds of exemplar refinement (no weights change), from `exemplars` (default: the first
  `num_exemplars` TPs' greedy solutions; each {"question", "task", "answer", "text", "source"}). OUTPUT_DIR/m3/m3.json
  logs each round's students' exam accuracy and the teacher's few-shot held-out accuracy, then the final set's."""
  out = epath.Path(config.output_dir) / "m3"
  pool = read_problems(config.exam_input) if config.exam_input else read_problems(config.input)
  exemplars = list(exemplars) if exemplars is not None else initial_exemplars(config, num_exemplars)
  history, mesh = [], _mesh(config)
  for number in range(rounds + 1):
    directory = out / f"round_{number}"
    graded = examine_exemplars(config, exemplars, pool, config.seed + number, mesh)
    prefix = "".join(e["text"] + " " for e in exemplars)
    entry = {"round": number, "exemplars": [e["source"] for e in exemplars],
             "exam_accuracy": float(np.mean([g["accuracy"] for g in graded])),
             "exemplar_accuracy": [g["accuracy"] for g in graded],
             "held_out_accuracy": solver_accuracy(config, config.teacher, held_out, str(directory / "held_out"),
                                                  prefix), "replaced": None}
    worst_position = int(np.argmin([g["accuracy"] for g in graded]))
    failed = [p for p in pool if p.index in graded[worst_position]["failed"]]
    if number < rounds and failed:
      new = replacement(config, exemplars, worst_position, failed, pool, directory, mesh)
      if new is not None and new["lbt_score"] > graded[worst_position]["accuracy"]:
        entry["replaced"] = {"position": worst_position, "old": exemplars[worst_position]["source"],
                             "new": new["source"], "old_accuracy": graded[worst_position]["accuracy"],
                             "new_lbt_score": new["lbt_score"]}
        exemplars = exemplars[:worst_position] + [new] + exemplars[worst_position + 1:]
    log.info("LbT M3 round %d: exam accuracy %.4f, held-out few-shot accuracy %.4f, replaced %s", number,
             entry["exam_accuracy"], entry["held_out_accuracy"], entry["replaced"])
    history.append(entry)
  if jax.process_index() == 0:
    (out / "m3.json").write_text(json.dumps(history, indent=2))
    (out / "exemplars.json").write_text(json.dumps(exemplars, indent=2))
  return history


# ----------------------------------------------------------------------------------------------- repeated DPO


def iterate_dpo(config: LbtConfig, rounds: int, dpo_settings: dict, held_out: Optional[annotation_inputs.InputSpec],
                pairs_from: str = "lbt", min_gap: float = 0.0, max_pairs: int = 4) -> list[dict]:
  """Rounds of score -> pairs -> DPO, each round's teacher the previous round's DPO result (OUTPUT_DIR/rounds.json:
  the mean LbT score and the teacher's held-out solver accuracy per round)."""
  teacher, history = config.teacher, []
  for number in range(rounds):
    round_config = dataclasses.replace(config, teacher=teacher,
                                       output_dir=str(epath.Path(config.output_dir) / f"round_{number}"))
    scores = [json.loads(line) for line in epath.Path(score(round_config)).read_text().splitlines()]
    entry: dict[str, Any] = {"round": number, "teacher": teacher,
                             "mean_lbt_score": float(np.mean([r["lbt_score"] for r in scores])),
                             "mean_lbt_gain": float(np.mean([r["lbt_gain"] for r in scores])),
                             "held_out_accuracy": solver_accuracy(round_config, teacher, held_out, str(
                                 epath.Path(round_config.output_dir) / "held_out")) if held_out else None}
    pairs = preference_pairs(round_config, pairs_from, min_gap, max_pairs)
    if epath.Path(pairs).read_text().strip():
      model_dir = str(epath.Path(round_config.output_dir) / "dpo")
      entry["dpo"] = dpo_teacher(round_config, pairs, teacher, model_dir, dpo_settings)
      teacher = model_dir
    else:
      log.warning("LbT round %d: no preference pairs; the teacher is kept", number)
    log.info("LbT round %d: mean LbT score %.4f, held-out accuracy %s", number, entry["mean_lbt_score"],
             entry["held_out_accuracy"])
    history.append(entry)
  if jax.process_index() == 0:
    (epath.Path(config.output_dir) / "rounds.json").write_text(json.dumps(history, indent=2))
  return history


# ----------------------------------------------------------------------------------------------- entry points


@gin.configurable
def lbt_config(*, input: str, output_dir: str, teacher: str, students: Sequence[str],
               exam_input: Optional[str] = None, **settings: Any) -> LbtConfig:
  """An LbtConfig from gin (gin/runs/lbt.gin); `settings` are LbtConfig's other fields."""
  spec = annotation_inputs.InputSpec(input)
  exam = annotation_inputs.InputSpec(exam_input) if exam_input else None
  for name in ("mesh_shape", "stop_strings"):
    if name in settings:
      settings[name] = tuple(settings[name])
  return LbtConfig(input=spec, output_dir=output_dir, teacher=teacher, students=tuple(students),
                   exam_input=exam, **settings)


def _config() -> LbtConfig:
  return gin.get_configurable(lbt_config)()


def _spec(path: Optional[str], what: str) -> annotation_inputs.InputSpec:
  if not path:
    raise ValueError(f"set HELD_OUT (the held-out problems, a JSONL like INPUT): {what} measures the teacher on them")
  return annotation_inputs.InputSpec(path)


@gin.configurable
def score_command() -> str:
  """`lbt score`: M1 scoring; returns the path of scores.jsonl."""
  return score(_config())


@gin.configurable
def select_command(selection: str = "lbt_sum") -> str:
  """`lbt select`: the selected candidates in the annotation format; returns their path."""
  return select(_config(), selection)


@gin.configurable
def report_command() -> str:
  """`lbt report`: every selection method's accuracy against the TPs' gold; returns the Markdown table."""
  return report_markdown(selection_report(_config()))


@gin.configurable
def pairs_command(pairs_from: str = "correctness+lbt", min_gap: float = 0.0, max_pairs: int = 4) -> str:
  """`lbt pairs`: DPO preference pairs from the scores; returns the path of pairs.jsonl."""
  return preference_pairs(_config(), pairs_from, min_gap, max_pairs)


@gin.configurable
def m2_command(held_out: Optional[str] = None, pairings: Sequence[str] = lbt_selection.PAIRINGS,
               dpo_settings: Optional[dict] = None, min_gap: float = 0.0, max_pairs: int = 4) -> dict:
  """`lbt m2`: held-out accuracy before and after DPO, per pairing mode."""
  return m2(_config(), _spec(held_out, "m2"), tuple(pairings), dict(dpo_settings or {}), min_gap, max_pairs)


@gin.configurable
def refine_command(held_out: Optional[str] = None, num_exemplars: int = 4, rounds: int = 2) -> list[dict]:
  """`lbt refine`: M3 exemplar refinement; returns the per-round log."""
  return refine(_config(), _spec(held_out, "refine"), num_exemplars, rounds)


@gin.configurable
def iterate_dpo_command(rounds: int = 2, held_out: Optional[str] = None, dpo_settings: Optional[dict] = None,
                        pairs_from: str = "lbt", min_gap: float = 0.0, max_pairs: int = 4) -> list[dict]:
  """`lbt iterate_dpo`: ROUNDS rounds of score -> pairs -> DPO; returns the per-round log."""
  spec = annotation_inputs.InputSpec(held_out) if held_out else None
  return iterate_dpo(_config(), rounds, dict(dpo_settings or {}), spec, pairs_from, min_gap, max_pairs)


COMMANDS = {"score": score_command, "select": select_command, "report": report_command, "pairs": pairs_command,
            "m2": m2_command, "refine": refine_command, "iterate_dpo": iterate_dpo_command}


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = list(sys.argv[1:] if argv is None else argv)
  if not args or args[0] not in COMMANDS:
    print(f"usage: python -m teacherlm_jax.lbt {{{','.join(COMMANDS)}}} --gin_file=gin/runs/lbt.gin "
          "--gin.NAME=VALUE ...", file=sys.stderr)
    return 2
  return shell.run_entry_point(COMMANDS[args[0]], args[1:], print)


if __name__ == "__main__":
  from teacherlm_jax import lbt as lbt_module
  sys.exit(lbt_module.main())
