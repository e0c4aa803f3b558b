"""Learning by teaching: exam choice, selection and vote math, a constructed example where the explaining rationale
wins, deterministic scores, and a tiny end-to-end run of two rounds (annotate -> score -> DPO) with its report."""

import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from teacherlm_jax import annotation_inputs, checkpoints, convert, lbt, report, vocabularies
from teacherlm_jax.models import bloom, common

from conftest import FIXTURES

FALSE = ["Fire is cold.", "Snow is hot.", "Fish can walk on the moon.", "Rocks are soft.", "The sea is dry.",
         "Birds are made of glass."]
TRUE = ["Ice is cold.", "Fire is hot."]


def _problem(sentence, letter):
  question = f"Determine the correctness of the following sentence. {sentence} (A) True (B) False"
  return {"question": question, "answer": f"({letter})"}


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


def test_option_letters_and_exam_choice_are_deterministic():
  assert lbt.option_letters("Q? (A) x (B) y (C) z") == ("A", "B", "C")
  assert lbt.option_letters("no options") == ()
  pool = [lbt.Problem(i, q, ("A", "B"), "B") for i, q in enumerate(["ice is cold", "fire is hot", "ice is hot",
                                                                     "snow is cold", "rocks are soft"])]
  random = lbt.choose_exams(pool, pool, 2, "random", seed=0, same_pool=True)
  assert random == lbt.choose_exams(pool, pool, 2, "random", seed=0, same_pool=True)
  assert all(i not in exam and len(set(exam)) == 2 for i, exam in random.items())
  assert random != lbt.choose_exams(pool, pool, 2, "random", seed=1, same_pool=True)
  lexical = lbt.choose_exams(pool[:1], pool, 2, "lexical", seed=0, same_pool=True)
  assert lexical == {0: [2, 3]}  # "ice is hot" and "snow is cold" share the most words with "ice is cold"
  with pytest.raises(ValueError, match="larger than the 4 problems"):
    lbt.choose_exams(pool, pool, 5, "random", seed=0, same_pool=True)
  two_tasks = [lbt.Problem(p.index, p.question, p.letters, p.answer, task="ab"[p.index % 2]) for p in pool]
  same_task = lbt.choose_exams(two_tasks, two_tasks, 1, "random", seed=0, same_pool=True)
  assert all(exam[0] % 2 == index % 2 for index, exam in same_task.items())  # exams come from the same task


def test_selection_and_weighted_vote_on_hand_made_scores():
  rows = [{"candidate": k, "lbt_score": s, "gold_log_likelihood": g}
          for k, (s, g) in enumerate([(0.5, -3.0), (0.25, -1.0), (0.75, -2.0), (0.75, -1.5)])]
  assert lbt.best(rows)["candidate"] == 3 and lbt.worst(rows)["candidate"] == 1
  # A: 0.5 + 0.75 = 1.25, B: 0.25 + 0.75 = 1.0 -> A, kept with its best candidate (3)
  assert lbt.weighted_vote(rows, ["A", "B", "B", "A"]) == ("A", rows[3])
  # a tie (A 1.25 vs B 1.25) goes to the answer of the best candidate overall
  tied = rows[:3] + [{"candidate": 3, "lbt_score": 0.5, "gold_log_likelihood": -9.0}]
  assert lbt.weighted_vote(tied, ["A", "B", "A", "B"])[0] == "A"
  assert lbt.weighted_vote(rows[:2], ["B", "B"]) == ("B", rows[0])


def test_the_explaining_rationale_scores_higher_than_an_empty_or_shuffled_one(tmp_path, student):
  problems_path = _write(tmp_path / "problems.jsonl", [_problem(s, "B") for s in FALSE[:5]])
  config = lbt.LbtConfig(input=annotation_inputs.InputSpec(problems_path), output_dir=str(tmp_path / "lbt"),
                         teacher=("cot", "unused"), students=(student,), num_candidates=3, exam_size=4,
                         batch_size=8, max_length=1024)
  prompt = annotation_inputs.sample(config.input, None, _problem(FALSE[0], "B")).prompt("cot")
  rationales = [" It is false: (B). " + "B " * 30, "", " It is true: (A). " + "A " * 30]  # explaining, empty, other's
  records = [{**_problem(FALSE[0], "B"), "cot": rationale.strip(), "all": prompt + rationale,
              "provenance": {"index": 0, "sample": k}} for k, rationale in enumerate(rationales)]
  (tmp_path / "lbt" / "candidates").mkdir(parents=True)
  _write(tmp_path / "lbt" / "candidates" / "annotated.jsonl", records)  # an annotation run with num_samples=3
  problems = lbt.read_problems(config.input)
  exams = lbt.choose_exams(problems[:1], problems, 4, "random", 0, same_pool=True)
  rows = lbt.score_rows(config, problems[:1], problems, exams)
  key = {row["candidate"]: (row["lbt_score"], row["gold_log_likelihood"]) for row in rows}
  assert key[0][0] == 1.0 and key[0] > key[1] and key[0] > key[2]
  assert key[2][0] == 0.0  # taught with a rationale for the other answer, the student fails every exam question


@pytest.fixture(scope="module")
def rounds(tmp_path_factory, student):
  root = tmp_path_factory.mktemp("lbt")
  convert.import_hf(str(FIXTURES / "hf_bloom_tiny"), str(root / "teacher"))
  problems = _write(root / "problems.jsonl", [_problem(s, "B") for s in FALSE] + [_problem(s, "A") for s in TRUE])
  held_out = _write(root / "held_out.jsonl", [_problem("Water is dry.", "B"), _problem("Grass is green.", "A")])
  config = lbt.LbtConfig(input=annotation_inputs.InputSpec(problems), output_dir=str(root / "run"),
                         teacher=("cot", str(root / "teacher")), students=(student,), num_candidates=2, exam_size=2,
                         max_new_tokens=12, batch_size=8, max_input_length=160, max_length=512, seed=1)
  dpo_settings = {"train_steps": 2, "beta": 0.5, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 0,
                  "sequence_length": 96}
  history = lbt.iterate(config, 2, dpo_settings, annotation_inputs.InputSpec(held_out))
  return root, config, history


def test_two_rounds_of_annotate_score_dpo(rounds):
  root, config, history = rounds
  assert [entry["round"] for entry in history] == [0, 1]
  assert json.loads((root / "run" / "rounds.json").read_text()) == history
  for entry in history:
    assert 0.0 <= entry["mean_lbt_score"] <= 1.0 and 0.0 <= entry["held_out_accuracy"] <= 1.0
  scores = [json.loads(line) for line in (root / "run" / "round_0" / "scores.jsonl").read_text().splitlines()]
  assert len(scores) == 8 * 2 and {row["candidate"] for row in scores} == {0, 1}
  assert all(row["text"].endswith(row["rationale"]) or not row["rationale"] for row in scores)
  # candidates scored differently, so there were pairs: round 1's teacher is round 0's DPO result
  assert history[0]["dpo"]["reward_accuracy"] == 1.0 and history[0]["dpo"]["reward_margin"] > 0
  assert history[1]["teacher"] == str(root / "run" / "round_0" / "dpo")
  assert (root / "run" / "round_0" / "dpo" / "final_params" / "teacherlm.json").exists()


def test_scores_are_deterministic_for_a_seed(rounds, tmp_path):
  root, config, _ = rounds
  again = lbt.LbtConfig(**{**config.__dict__, "output_dir": str(tmp_path / "again")})
  lbt.score(again)
  assert (tmp_path / "again" / "scores.jsonl").read_bytes() == (root / "run" / "round_0" / "scores.jsonl").read_bytes()


def test_selection_writes_the_annotation_format(rounds):
  root, config, _ = rounds
  round_config = lbt.LbtConfig(**{**config.__dict__, "output_dir": str(root / "run" / "round_0")})
  for selection in ("max", "weighted_vote"):
    records = [json.loads(line) for line in pathlib.Path(lbt.select(round_config, selection)).read_text().splitlines()]
    assert len(records) == 8 and all({"cot", "all", "provenance"} <= set(r) for r in records)
    scores = lbt.read_scores(str(root / "run" / "round_0" / "scores.jsonl"))
    for record in records:
      chosen = record["provenance"]["lbt"]
      assert chosen["selection"] == selection and chosen["scores"] == [r["lbt_score"] for r in
                                                                       scores[record["provenance"]["index"]]]
      if selection == "max":
        assert chosen["lbt_score"] == max(chosen["scores"])
      else:
        assert chosen["voted_answer"] in ("A", "B") and isinstance(chosen["agrees_with_gold"], bool)
  pairs = [json.loads(line) for line in (root / "run" / "round_0" / "pairs.jsonl").read_text().splitlines()]
  assert all(p["chosen_score"] > p["rejected_score"] and p["prompt"].endswith("Let's think step by step.")
             for p in pairs)


def test_the_report_shows_lbt(rounds):
  root, _, _ = rounds
  text = pathlib.Path(report.write_report(str(root / "run"))).read_text()
  assert "## Learning by teaching" in text and "| round_0 | 16 |" in text and "| 1 |" in text
  assert (root / "run" / "report" / "lbt.png").read_bytes()[:4] == b"\x89PNG"


def test_the_command_line_runs_through_gin(rounds):
  root, config, _ = rounds
  repo = pathlib.Path(__file__).resolve().parents[1]
  flags = [f"--gin_file={repo}/gin/runs/lbt.gin", f"--gin.INPUT='{config.input.source}'",
           f"--gin.OUTPUT_DIR='{root / 'run' / 'round_1'}'", f"--gin.TEACHER=('cot', '{config.teacher[1]}')",
           f"--gin.STUDENTS=['{config.students[0]}']", "--gin.NUM_CANDIDATES=2", "--gin.EXAM_SIZE=2",
           "--gin.MAX_NEW_TOKENS=12", "--gin.BATCH_SIZE=8"]
  assert lbt.main(["select"] + flags) == 0
  assert (root / "run" / "round_1" / "selected" / "annotated.jsonl").exists()
  assert lbt.main(["pairs"] + flags) == 0
  assert lbt.main(["unknown"]) == 2
