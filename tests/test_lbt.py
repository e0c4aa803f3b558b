"""Learning by teaching: exam strategies, every selection method and pairing mode on hand-made scores, a constructed
student for which an answer-carrying rationale has a positive lbt_gain and a letter-only one none, and a tiny run of
M1 (scoring never reads the teaching problems' gold), selection, the report, M2, M3 and repeated DPO."""

import json
import pathlib
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from teacherlm_jax import annotation_inputs, checkpoints, convert, lbt, lbt_exams, lbt_selection, partitioning, report
from teacherlm_jax import vocabularies
from teacherlm_jax.lbt_exams import Problem
from teacherlm_jax.models import bloom, common

from conftest import FIXTURES

FALSE = ["Fire is cold.", "Snow is hot.", "Fish can walk on the moon.", "Rocks are soft.", "The sea is dry.",
         "Birds are made of glass."]
TRUE = ["Ice is cold.", "Fire is hot.", "Grass is green."]
CREAK = "Determine the correctness of the following sentence. {} (A) True (B) False"


def _problem(sentence, letter):
  return {"question": CREAK.format(sentence), "answer": f"({letter})"}


def _write(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def bag_of_context_student(path) -> str:
  """A one-layer BLOOM that scores each option letter by how often the letter occurs in its context: value/output
  projections are identities, queries/keys zero (attention = ALiBi-weighted mean of the context's embeddings), the
  embedding LayerNorm scaled down so that the context, not the last token, decides. Byte vocabulary."""
  config = bloom.BloomConfig(vocab_size=264, hidden_size=256, num_layers=1, num_heads=4)
  params = jax.tree.map(np.array, nn.unbox(common.init_params(bloom.Bloom(config), jax.random.key(0))))
  params["word_embeddings"] = np.random.default_rng(0).normal(size=(264, 256)).astype(np.float32)
  params["word_embeddings_layernorm"]["scale"][...] = 0.02
  attention, mlp = params["h"]["self_attention"], params["h"]["mlp"]
  for leaf in list(attention.values()) + list(mlp.values()):
    leaf[...] = 0
  for head in range(4):
    for i in range(64):
      attention["qkv_kernel"][0, head * 64 + i, head, 2, i] = 1
      attention["dense_kernel"][0, head, i, head * 64 + i] = 1
  checkpoints.save_params(str(path), params, config, vocabulary=vocabularies.byte_vocabulary())
  return str(path)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
  return bag_of_context_student(tmp_path_factory.mktemp("student") / "bag")


# ----------------------------------------------------------------------------------------------- exams


def test_exam_strategies_are_deterministic_and_tfidf_ignores_the_template():
  assert lbt_exams.option_letters("Q? (A) x (B) y (C) z") == ("A", "B", "C")
  assert lbt_exams.option_letters("no options") == ()
  sentences = ["Penguins live in Antarctica.", "Dogs bark.",
               "Penguins eat fish near Antarctica coasts every winter season.", "Cats purr.", "Ice is cold."]
  pool = [Problem(i, CREAK.format(s), ("A", "B"), "A") for i, s in enumerate(sentences)]
  random = lbt_exams.choose_exams(pool, pool, 2, "random", seed=0, same_pool=True)
  assert random == lbt_exams.choose_exams(pool[::-1], pool, 2, "random", seed=0, same_pool=True)
  assert all(i not in exam and len(set(exam)) == 2 for i, exam in random.items())
  assert random != lbt_exams.choose_exams(pool, pool, 2, "random", seed=1, same_pool=True)
  # word-set overlap would pick "Dogs bark." (the template is most of a short question); TF-IDF weighs the template's
  # words 0 and picks the other question about penguins in Antarctica
  jaccard = [len(set(pool[0].question.lower().split()) & set(p.question.lower().split())) /
             len(set(pool[0].question.lower().split()) | set(p.question.lower().split())) for p in pool[1:3]]
  assert jaccard[0] > jaccard[1]
  vectors = lbt_exams.tfidf_vectors([p.question for p in pool[:1] + pool])
  assert lbt_exams.choose_exams(pool[:1], pool, 1, "tfidf", 0, True, vectors) == {0: [2]}
  template_words = lbt_exams.tfidf_vectors([p.question for p in pool])
  assert np.allclose(np.linalg.norm(template_words, axis=1), 1.0)
  with pytest.raises(ValueError, match="larger than the 4 problems"):
    lbt_exams.choose_exams(pool, pool, 5, "random", seed=0, same_pool=True)
  two_tasks = [Problem(p.index, p.question, p.letters, p.answer, task="ab"[p.index % 2]) for p in pool]
  same_task = lbt_exams.choose_exams(two_tasks, two_tasks, 1, "random", seed=0, same_pool=True)
  assert all(exam[0] % 2 == index % 2 for index, exam in same_task.items())  # exams come from the same task
  duplicate = pool + [Problem(9, pool[0].question, ("A", "B"), "A")]  # the same question under another index
  assert all(9 not in lbt_exams.choose_exams(pool[:1], duplicate, 4, "random", s, True)[0] for s in range(5))


def test_embedding_exams_pick_the_nearest_hidden_states(student):
  pool = [Problem(i, CREAK.format(s), ("A", "B"), "A") for i, s in
          enumerate(["Ice is cold.", "Ice is cold!", "Zebras yawn quietly at dusk.", "Ice is cold?", "Qq zz xx."])]
  mesh = partitioning.make_mesh(1, -1, 1)
  vectors = lbt_exams.exam_vectors(pool[:1], pool, "embedding", student, 8, 256, mesh)
  assert vectors.shape[0] == 6 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
  exams = lbt_exams.choose_exams(pool[:1], pool, 2, "embedding", 0, True, vectors)
  assert sorted(exams[0]) == [1, 3]  # the near-duplicates, not the unrelated questions
  with pytest.raises(ValueError, match="needs embedding_checkpoint"):
    lbt_exams.exam_vectors(pool, pool, "embedding", None, 8, 256, mesh)


# ----------------------------------------------------------------------------------------------- selection math


def _rows(*candidates):
  return [{"candidate": k, "answer": a, "lbt_score": s, "gold_log_likelihood": g}
          for k, (a, s, g) in enumerate(candidates)]


def test_every_selection_method_on_hand_made_scores():
  # three samples answer A (the greedy answer too) with poor exams, two answer B and teach well
  rows = _rows(("A", 0.25, -3.0), ("B", 0.75, -1.0), ("A", 0.0, -2.0), ("B", 0.5, -1.5), ("A", 0.25, -2.5))
  assert lbt_selection.choose("greedy", rows, "A") == "A"
  assert lbt_selection.choose("self_consistency", rows) == "A"  # 3 votes vs 2
  assert lbt_selection.choose("lbt_max", rows) == "B"  # candidate 1
  assert lbt_selection.choose("lbt_sum", rows) == "B"  # A: 0.5, B: 1.25 -> the right answer, B, is recovered
  assert lbt_selection.choose("lbt_mean", rows) == "B"  # A: 0.167, B: 0.625
  # sum and mean differ: many mediocre A's outweigh one excellent B in sum, not in mean; max follows the best
  many = _rows(("A", 0.5, -1.0), ("A", 0.5, -1.0), ("A", 0.5, -1.0), ("B", 1.0, -1.0))
  assert [lbt_selection.choose(m, many) for m in ("lbt_sum", "lbt_mean", "lbt_max")] == ["A", "B", "B"]
  # ties: self-consistency -> the answer sampled first; sum -> the group holding the best candidate
  tied = _rows(("B", 0.5, -2.0), ("A", 0.25, -1.0), ("A", 0.25, -1.0), ("B", 0.0, -3.0))
  assert lbt_selection.choose("self_consistency", tied) == "B"
  assert lbt_selection.choose("lbt_sum", tied) == "B"  # 0.5 each; B holds candidate 0 (0.5)
  assert lbt_selection.best(rows)["candidate"] == 1
  assert lbt_selection.representative("lbt_sum", rows, "A")["candidate"] == 4  # 0.25 twice; -2.5 beats -3.0
  assert lbt_selection.representative("self_consistency", rows, "B")["candidate"] == 1
  with pytest.raises(ValueError, match="needs the greedy"):
    lbt_selection.choose("greedy", rows)
  with pytest.raises(ValueError, match="not one of"):
    lbt_selection.choose("vote", rows)


def test_representative_prefers_the_gold_log_likelihood_on_equal_scores():
  rows = _rows(("A", 0.25, -3.0), ("A", 0.25, -2.5))
  assert lbt_selection.representative("lbt_max", rows, "A")["candidate"] == 1


def test_pairs_for_each_mode_on_hand_made_scores():
  rows = _rows(("A", 0.25, -3.0), ("B", 0.75, -1.0), ("B", 0.5, -1.5), ("A", 1.0, -0.5))
  def ids(pairs):
    return [(a["candidate"], b["candidate"]) for a, b in pairs]
  # gold B: correct 1, 2; incorrect 0, 3 (3 taught best but answers A)
  assert ids(lbt_selection.preference_pairs(rows, "correctness", "B")) == [(1, 0), (1, 3), (2, 0), (2, 3)]
  assert ids(lbt_selection.preference_pairs(rows, "lbt", None, max_pairs=3)) == [(3, 0), (1, 0), (3, 2)]
  assert ids(lbt_selection.preference_pairs(rows, "correctness+lbt", "B", max_pairs=10)) == [
      (1, 0), (1, 2), (2, 0), (1, 3), (2, 3)]  # by LbT gap: 0.5, 0.25 (ties by candidate), -0.25, -0.5
  assert ids(lbt_selection.preference_pairs(rows, "lbt", None, min_gap=0.5)) == [(3, 0)]
  with pytest.raises(ValueError, match="needs the teaching problem's gold"):
    lbt_selection.preference_pairs(rows, "correctness")
  with pytest.raises(ValueError, match="pairs_from must be one of"):
    lbt_selection.preference_pairs(rows, "best_vs_worst", "B")


# ----------------------------------------------------------------------------------------------- lbt_gain


def test_a_rationale_carrying_the_answer_has_a_positive_gain_and_a_letter_only_one_none(tmp_path, student):
  # The TP is true (its answer A), its exam problems are false (B): the letter A alone does not carry over. The
  # bag-of-context student answers the letter its context holds most, so a rationale that carries what the exam
  # needs (B) teaches it; a rationale that only leads to the letter teaches what the control does.
  problems = _write(tmp_path / "problems.jsonl", [_problem(TRUE[0], "A")] + [_problem(s, "B") for s in FALSE[:2]])
  config = lbt.LbtConfig(input=annotation_inputs.InputSpec(problems), output_dir=str(tmp_path / "lbt"),
                         teacher="unused", students=(student,), num_candidates=2, exam_size=2, batch_size=8,
                         max_length=1024)
  read = {p.index: p for p in lbt_exams.read_problems(config.input)}
  rationales = {(0, 0): "Such sentences are mostly false (B), " + "B " * 24 + "but this one is true.", (0, 1): ""}
  solutions = {key: {"cot": text} for key, text in rationales.items()}
  rows = lbt.score_rows(config, read, read, {0: [1, 2]}, solutions, {(0, 0): "A", (0, 1): "A"},
                        partitioning.make_mesh(1, -1, 1))
  carrying, letter_only = rows
  assert carrying["text"] == ("Q: " + CREAK.format(TRUE[0]) + " A: Let's think step by step. Such sentences are "
                              "mostly false (B), " + "B " * 24 + "but this one is true. So the answer is (A).")
  assert letter_only["text"] == "Q: " + CREAK.format(TRUE[0]) + " A: Let's think step by step. So the answer is (A)."
  assert carrying["control"] == letter_only["control"] == 0.0  # `Q: ... A: The answer is (A).` teaches A: fails
  assert carrying["lbt_score"] == 1.0 and carrying["lbt_gain"] == 1.0
  assert letter_only["lbt_score"] == 0.0 and letter_only["lbt_gain"] == 0.0
  assert carrying["students"][student] == {"accuracy": 1.0, "control": 0.0,
                                           "gold_log_likelihood": carrying["gold_log_likelihood"]}
  assert carrying["gold_log_likelihood"] > letter_only["gold_log_likelihood"]


def test_students_in_generate_mode_write_their_own_rationale(tmp_path, student):
  problems = _write(tmp_path / "problems.jsonl", [_problem(s, "A") for s in TRUE])
  config = lbt.LbtConfig(input=annotation_inputs.InputSpec(problems), output_dir=str(tmp_path / "lbt"),
                         teacher="unused", students=(student,), student_mode="generate", student_max_new_tokens=6,
                         batch_size=8, max_length=512)
  read = lbt_exams.read_problems(config.input)
  mesh = partitioning.make_mesh(1, -1, 1)
  prompts = [f"Q: {read[0].question} A: Let's think step by step. A A A So the answer is (A)." + q
             for q in lbt.exam_questions(config, read[1:])]
  assert prompts[0].endswith(f" Q: {read[1].question} A: Let's think step by step.")
  texts = lbt.student_generations(config, student, prompts, mesh)
  assert len(texts) == 2 and all(0 < len(t.encode()) <= 6 for t in texts)  # bytes: one token each
  correct, gold = lbt.student_exam(config, student, prompts[:1], [read[1:]], mesh)
  assert correct[0].shape == (2,) and np.all(gold[0] < 0)


# ----------------------------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def run(tmp_path_factory, student):
  root = tmp_path_factory.mktemp("lbt")
  convert.import_hf(str(FIXTURES / "hf_bloom_tiny"), str(root / "teacher"))
  problems = [_problem(s, "B") for s in FALSE[:4]] + [_problem(s, "A") for s in TRUE[:2]]
  _write(root / "problems.jsonl", problems)
  pool = _write(root / "pool.jsonl", [_problem(s, "B") for s in FALSE[4:] + ["Stones can fly."]])
  held_out = _write(root / "held_out.jsonl", [_problem("Water is dry.", "B"), _problem("Grass is green.", "A")])
  config = lbt.LbtConfig(input=annotation_inputs.InputSpec(str(root / "problems.jsonl")),
                         output_dir=str(root / "run"), teacher=str(root / "teacher"), students=(student, student),
                         exam_input=annotation_inputs.InputSpec(pool), num_candidates=3, exam_size=2,
                         max_new_tokens=10, batch_size=8, max_input_length=160, max_length=512, seed=1)
  lbt.score(config)
  return root, config, annotation_inputs.InputSpec(held_out)


def _lines(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_m1_scores_every_candidate_with_its_control(run):
  root, config, _ = run
  scores = _lines(root / "run" / "scores.jsonl")
  assert len(scores) == 6 * 3 and {row["candidate"] for row in scores} == {0, 1, 2}
  for row in scores:
    assert row["text"].startswith("Q: Determine") and "The answer is" not in row["text"]  # the answer withheld
    assert row["text"].endswith(f" So the answer is ({row['answer']}).") and row["answer"] in ("A", "B")
    assert row["lbt_gain"] == pytest.approx(row["lbt_score"] - row["control"])
    assert 0.0 <= row["lbt_score"] <= 1.0 and len(row["exam"]) == 2
  answers = _lines(root / "run" / "answers.jsonl")
  assert sum(r["run"] == "greedy" for r in answers) == 6 and sum(r["run"] == "sampled" for r in answers) == 18
  candidates = _lines(root / "run" / "candidates" / "annotated.jsonl")
  assert candidates[0]["all"].startswith("Q: Determine") and "Let's think step by step." in candidates[0]["all"]


def test_m1_never_reads_the_teaching_problems_gold(run, tmp_path):
  root, config, _ = run
  flipped = tmp_path / "run"
  shutil.copytree(root / "run" / "candidates", flipped / "candidates")
  shutil.copytree(root / "run" / "greedy", flipped / "greedy")
  original = (root / "problems.jsonl").read_text()
  try:  # the same input path (the annotation runs resume), every gold letter flipped
    (root / "problems.jsonl").write_text(original.replace('"(B)"', '"(X)"').replace('"(A)"', '"(B)"')
                                         .replace('"(X)"', '"(A)"'))
    again = lbt.LbtConfig(**{**config.__dict__, "output_dir": str(flipped)})
    lbt.score(again)
    selected = {m: lbt.selections(again, m) for m in lbt_selection.METHODS}
  finally:
    (root / "problems.jsonl").write_text(original)
  assert (flipped / "scores.jsonl").read_bytes() == (root / "run" / "scores.jsonl").read_bytes()
  assert selected == {m: lbt.selections(config, m) for m in lbt_selection.METHODS}


def test_selection_writes_the_annotation_format_and_the_report_reads_the_gold(run):
  root, config, _ = run
  for method in lbt_selection.METHODS:
    records = _lines(lbt.select(config, method))
    assert len(records) == 6 and all({"cot", "all", "provenance"} <= set(r) for r in records)
    chosen = lbt.selections(config, method)
    assert [r["provenance"]["lbt"]["answer"] for r in records] == [chosen[i] for i in sorted(chosen)]
    assert all(r["provenance"]["lbt"]["selection"] == method for r in records)
  result = lbt.selection_report(config)
  assert set(result["student_sets"]) == {"all students", config.students[0]}
  gold = {p.index: p.answer for p in lbt_exams.read_problems(config.input)}
  for method in lbt_selection.METHODS:
    chosen = lbt.selections(config, method)
    expected = np.mean([chosen[i] == gold[i] for i in gold])
    assert result["student_sets"]["all students"][method] == pytest.approx(expected)
  table = (root / "run" / "selection_report.md").read_text()
  assert "| all students |" in table and "lbt_sum" in table


def test_m2_pairs_and_the_teachers_accuracy_before_and_after(run):
  root, config, held_out = run
  result = lbt.m2(config, held_out, ("correctness", "lbt"), {"train_steps": 2, "beta": 0.5, "batch_size": 8,
                                                              "learning_rate": 1e-3, "sequence_length": 96})
  assert json.loads((root / "run" / "m2" / "m2.json").read_text()) == result
  assert 0.0 <= result["before"] <= 1.0 and set(result["pairings"]) == {"correctness", "lbt"}
  assert any(entry["pairs"] for entry in result["pairings"].values())  # at least one teacher was trained
  gold = {p.index: p.answer for p in lbt_exams.read_problems(config.input)}
  scores = {(r["index"], r["candidate"]): r for r in _lines(root / "run" / "scores.jsonl")}
  for pairing, entry in result["pairings"].items():
    pairs = _lines(root / "run" / "m2" / pairing / "pairs.jsonl")
    assert entry["pairs"] == len(pairs) and 0.0 <= entry["after"] <= 1.0
    for pair in pairs:
      chosen, rejected = scores[(pair["index"], pair["chosen_candidate"])], scores[(pair["index"],
                                                                                     pair["rejected_candidate"])]
      if pairing == "correctness":
        assert chosen["answer"] == gold[pair["index"]] != rejected["answer"]
      else:
        assert chosen["lbt_score"] > rejected["lbt_score"]
      assert pair["prompt"].endswith("A: Let's think step by step.") and pair["chosen"].endswith(").")
    if not entry["pairs"]:  # e.g. every candidate of every TP gave the same answer: no correct / incorrect pair
      assert entry["after"] == result["before"] and "dpo" not in entry
    else:
      assert entry["dpo"]["reward_margin"] > 0 and entry["dpo"]["learning_rate"] > 0
      assert (root / "run" / "m2" / pairing / "dpo" / "final_params" / "teacherlm.json").exists()
      assert json.loads((root / "run" / "m2" / pairing / "held_out" / "accuracy.json").read_text())["checkpoint"] \
          == str(root / "run" / "m2" / pairing / "dpo")


def test_m3_replaces_a_failing_exemplar_and_logs_both_accuracies(run):
  root, config, held_out = run
  refine_config = lbt.LbtConfig(**{**config.__dict__, "students": (config.students[0],)})
  # the first exemplar teaches the wrong letter for the task (every exam problem's answer is B): students fail
  initial = lbt.initial_exemplars(refine_config, 2)
  initial[0] = {**initial[0], "answer": "A", "source": "planted",
                "text": f"Q: {FALSE[0]} A: Let's think step by step. " + "A " * 40 + "So the answer is (A)."}
  history = lbt.refine(refine_config, held_out, exemplars=initial, rounds=1)
  assert [entry["round"] for entry in history] == [0, 1]
  first = history[0]
  assert first["exemplar_accuracy"][0] == 0.0 and first["replaced"]["old"] == "planted"
  assert first["replaced"]["new"].startswith("exam problem ") and first["replaced"]["new_lbt_score"] > 0.0
  assert history[1]["exemplars"][0] == first["replaced"]["new"] and "planted" not in history[1]["exemplars"]
  for entry in history:
    assert 0.0 <= entry["exam_accuracy"] <= 1.0 and 0.0 <= entry["held_out_accuracy"] <= 1.0
  assert json.loads((root / "run" / "m3" / "m3.json").read_text()) == history


def test_iterate_dpo_and_the_command_line(run):
  root, config, held_out = run
  repo = pathlib.Path(__file__).resolve().parents[1]
  flags = [f"--gin_file={repo}/gin/runs/lbt.gin", f"--gin.INPUT='{config.input.source}'",
           f"--gin.EXAM_INPUT='{config.exam_input.source}'", f"--gin.OUTPUT_DIR='{root / 'run'}'",
           f"--gin.TEACHER='{config.teacher}'", f"--gin.STUDENTS=['{config.students[0]}', '{config.students[1]}']",
           "--gin.NUM_CANDIDATES=3", "--gin.EXAM_SIZE=2", "--gin.MAX_NEW_TOKENS=10", "--gin.BATCH_SIZE=8",
           "--gin.SEED=1", "lbt.lbt_config.max_input_length=160", "lbt.lbt_config.max_length=512"]
  flags = [f if f.startswith("--") else f"--gin.{f}" for f in flags]
  assert lbt.main(["select"] + flags + ["--gin.SELECTION='lbt_mean'"]) == 0
  assert _lines(root / "run" / "selected" / "annotated.jsonl")[0]["provenance"]["lbt"]["selection"] == "lbt_mean"
  assert lbt.main(["report"] + flags) == 0
  assert lbt.main(["unknown"]) == 2
  history = lbt.iterate_dpo(config, 1, {"train_steps": 1, "beta": 0.5, "batch_size": 8, "learning_rate": 1e-3,
                                        "sequence_length": 96}, held_out)
  assert history[0]["round"] == 0 and 0.0 <= history[0]["held_out_accuracy"] <= 1.0
  text = pathlib.Path(report.write_report(str(root / "run"))).read_text()
  assert "## Learning by teaching" in text and "| round_0 | 18 |" in text
  assert "answer selection (6 teaching problems" in text and "| all students |" in text
  assert "M2: the teacher's held-out accuracy" in text and "| correctness |" in text
  assert "M3 exemplar refinement" in text and "planted -> exam problem" in text
