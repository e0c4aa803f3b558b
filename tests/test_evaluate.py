"""Rank-classification evaluation: option log-likelihoods vs transformers, scoring math, MMLU averages, batch-size
and device-count invariance, k-shot contexts, result files."""

import csv
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasks import mmlu_subjects, rendering
from teacherlm_jax import convert, evaluate, partitioning, vocabularies

from conftest import FIXTURES

VOCABULARY = vocabularies.HfTokenizerVocabulary(str(FIXTURES / "hf_bloom_tiny" / "tokenizer.json"))
REFERENCE = json.loads((FIXTURES / "hf_bloom_tiny_rank_scores.json").read_text())


@pytest.fixture(scope="module")
def tiny():
  return convert.load_hf(str(FIXTURES / "hf_bloom_tiny"))


def _examples(cases):
  return [evaluate.EvalExample(case["context"], tuple(case["options"]), 0, str(i)) for i, case in enumerate(cases)]


def _scorer(model, params):
  score = evaluate.jit_score(model)
  return lambda *arrays: score(params, *arrays)


def test_option_log_likelihoods_equal_transformers(tiny):
  model, params = tiny
  for case in REFERENCE:  # same tokens as the fixture script
    assert VOCABULARY.encode(case["context"]) == case["context_ids"]
    assert [VOCABULARY.encode(option) for option in case["options"]] == case["option_ids"]
  single = [case for case in REFERENCE if case["task"] != "multi_token"]
  for cases in (single, REFERENCE):  # one-token options only (no second call), then with several-token options
    scores = evaluate.score_examples(_examples(cases), _scorer(model, params), VOCABULARY, batch_size=4,
                                     max_length=256)
    for case, ours in zip(cases, scores):
      np.testing.assert_allclose(ours, case["log_likelihoods"], atol=1e-4, rtol=0)
  contexts = {case["task"]: case["context"] for case in REFERENCE}
  assert contexts["teacherlm_eval_ecqa"].endswith(rendering.ANSWER_PREFIX)


def test_scores_are_the_sum_of_token_log_probabilities_of_a_full_forward(tiny):
  model, params = tiny
  context, options = [5, 9, 13, 200, 7], [[31], [40, 41, 42], [7, 7]]
  tokens, mask = np.asarray([context], np.int32), np.ones((1, 5), np.int32)
  option_tokens, option_mask = evaluate.option_arrays([options], 3, 3)
  ours = evaluate.jit_score(model)(params, tokens, mask, option_tokens, option_mask)[0]
  for k, option in enumerate(options):
    logits = model.apply({"params": params}, jnp.asarray([context + option]))[0]
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    expected = sum(log_probs[len(context) - 1 + j, token] for j, token in enumerate(option))
    assert ours[k] == pytest.approx(expected, abs=1e-5)


def test_accuracy_micro_and_macro_averages_by_hand():
  examples = [evaluate.EvalExample("c", ("A", "B"), 0, "1", "anatomy", "STEM"),
              evaluate.EvalExample("c", ("A", "B"), 1, "2", "anatomy", "STEM"),
              evaluate.EvalExample("c", ("A", "B", "C"), 2, "3", "philosophy", "humanities")]
  scores = [np.array([-1.0, -2.0]), np.array([-1.0, -2.0]), np.array([-3.0, -2.0, -1.0])]
  report = evaluate.accuracy_report(examples, scores)
  assert report["accuracy"] == pytest.approx(2 / 3)
  assert report["subject_macro_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
  assert report["per_subject"] == {"anatomy": {"examples": 2, "accuracy": 0.5},
                                   "philosophy": {"examples": 1, "accuracy": 1.0}}
  assert report["per_category"]["STEM"]["accuracy"] == 0.5
  assert "per_subject" not in evaluate.accuracy_report(examples[:1] * 0 + [
      evaluate.EvalExample("c", ("A", "B"), 0, "1")], scores[:1])


def test_mmlu_csv_examples_and_their_averages():
  examples = evaluate.task_examples("teacherlm_eval_mmlu", "test")
  subjects = sorted({e.subject for e in examples})
  path = next((FIXTURES.parent.parent / "tasks" / "data" / "mmlu" / "test").glob(f"{subjects[0]}_test.csv"))
  first_row = next(csv.reader(path.open()))
  first = next(e for e in examples if e.subject == subjects[0])
  assert first.context == rendering.mmlu_context(subjects[0], first_row[0], first_row[1:5])
  assert first.options == ("A", "B", "C", "D") and first.target == "ABCD".index(first_row[5])
  assert first.category == mmlu_subjects.category(subjects[0])
  report = evaluate.accuracy_report(examples, [np.eye(4)[e.target] if i % 2 else np.eye(4)[(e.target + 1) % 4]
                                               for i, e in enumerate(examples)])
  per_subject = report["per_subject"]
  assert sum(v["examples"] for v in per_subject.values()) == len(examples)
  assert report["accuracy"] == pytest.approx(len(examples) // 2 / len(examples))
  assert report["subject_macro_accuracy"] == pytest.approx(np.mean([v["accuracy"] for v in per_subject.values()]))


def test_results_do_not_depend_on_batch_size_or_device_count(tiny):
  model, params = tiny
  examples = evaluate.task_examples("teacherlm_eval_ecqa", "test")[:12]
  one_device = evaluate.score_examples(examples, _scorer(model, params), VOCABULARY, batch_size=1, max_length=256)
  mesh = partitioning.make_mesh(data=2, fsdp=4)
  _, sharded = convert.load_hf(str(FIXTURES / "hf_bloom_tiny"), mesh=mesh)
  score = evaluate.jit_score(model, mesh)
  with partitioning.activation_rules(mesh):
    eight = evaluate.score_examples(examples, lambda *a: score(sharded, *a), VOCABULARY, batch_size=8, max_length=256,
                                    row_multiple=partitioning.data_parallel_size(mesh))
  for a, b in zip(one_device, eight):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
  assert [int(np.argmax(s)) for s in one_device] == [int(np.argmax(s)) for s in eight]


def test_k_shot_contexts_keep_the_mmlu_header_once():
  shots = evaluate.task_examples("teacherlm_eval_mmlu", "dev")
  examples = evaluate.task_examples("teacherlm_eval_mmlu", "test")[:2]
  two_shot = evaluate.with_shots(examples, shots, 2)
  header = rendering.MMLU_HEADER.format(subject=examples[0].subject.replace("_", " "))
  context = two_shot[0].context
  assert context.startswith(header) and context.count("The following are multiple choice") == 1
  assert context.count(" A: The answer is (") == 3 and context.endswith(examples[0].context[len(header):])
  same = [s for s in shots if s.subject == examples[0].subject][0]
  assert f"The answer is ({same.options[same.target]}). Q: " in context
  with pytest.raises(ValueError, match="only"):
    evaluate.with_shots(examples, shots, 50)


def test_run_writes_json_markdown_and_predictions(tmp_path):
  results = evaluate.run(str(FIXTURES / "hf_bloom_tiny"), ["teacherlm_eval_creak", "teacherlm_eval_mmlu"],
                         output_dir=str(tmp_path), batch_size=8, max_examples=8)
  stored = json.loads((tmp_path / "eval_results.json").read_text())
  assert stored["tasks"] == json.loads(json.dumps(results))
  assert results["teacherlm_eval_creak"]["split"] == "validation" and results["teacherlm_eval_mmlu"]["split"] == "test"
  assert results["teacherlm_eval_creak"]["examples"] == 8 and "subject_macro_accuracy" in results["teacherlm_eval_mmlu"]
  table = (tmp_path / "eval_results.md").read_text()
  assert "| teacherlm_eval_creak | validation | 0 | 8 |" in table and "per category" in table
  predictions = [json.loads(line) for line in (tmp_path / "predictions_teacherlm_eval_creak.jsonl").open()]
  assert len(predictions) == 8 and all(len(p["scores"]) == 2 for p in predictions)
  correct = sum(p["prediction"] == p["target"] for p in predictions) / 8
  assert results["teacherlm_eval_creak"]["accuracy"] == pytest.approx(correct)


WORDS = ("the sun is a star and it rises in the east every day water boils at one hundred degrees while ice melts "
         "above zero so birds fly south").split()
SHARED_OPTIONS = ("A", "B", "C) no")  # the last is several tokens in every family's tokenizer


@functools.lru_cache(maxsize=None)
def _family(name: str):
  directory = FIXTURES / f"hf_{name}_tiny"
  model, params = convert.load_hf(str(directory))
  return model, params, vocabularies.HfTokenizerVocabulary(str(directory / "tokenizer.json"))


def _exam_workload(seed: int = 0):
  """Prefixes and their exams: exams of 3, 1, 2, 2 and 0 questions of different lengths; the first and third
  prefixes are too long for max_length 48 with some or all of their questions (their questions then follow
  differently trimmed copies of the prefix)."""
  rng = np.random.default_rng(seed)
  text = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
  prefixes = [f"Given {text(n)}." for n in (4, 1, 40, 5, 2)]
  exams = [[evaluate.EvalExample(f" Q: {text(n)}? A: (", SHARED_OPTIONS, 0, f"{i}-{j}")
            for j, n in enumerate(lengths)] for i, lengths in enumerate([(1, 4, 2), (2,), (1, 4), (3, 1), ()])]
  return prefixes, exams


def _per_prompt(prefixes, exams):
  return [dataclasses.replace(e, context=prefix + e.context) for prefix, exam in zip(prefixes, exams) for e in exam]


@pytest.mark.parametrize("name", ["bloom", "opt", "llama"])
def test_shared_prefix_scores_equal_scores_of_the_whole_prompts(name):
  model, params, vocabulary = _family(name)  # BLOOM: ALiBi, no BOS; OPT: learned positions, BOS; Llama: RoPE, BOS
  prefixes, exams = _exam_workload()
  whole = _per_prompt(prefixes, exams)
  for prefix, exam in zip(prefixes, exams):  # the same token ids on both sides
    for example in exam:
      assert vocabulary.encode(prefix + example.context) == vocabulary.encode(prefix) + vocabulary.encode(
          example.context)
  lengths = [len(vocabularies.encode_prompt(vocabulary, e.context)) for e in whole]
  assert max(lengths[:3]) <= 48 and min(lengths[4:6]) > 48  # exam 0 shares its whole prefix; exam 2 is trimmed
  assert any(len(vocabulary.encode(o)) > 1 for o in SHARED_OPTIONS)
  shared_score = evaluate.jit_score_shared(model)
  shared = evaluate.score_shared_examples(prefixes, exams, lambda *a: shared_score(params, *a), vocabulary,
                                          batch_size=16, max_length=48)
  reference = evaluate.score_examples(whole, _scorer(model, params), vocabulary, batch_size=8, max_length=48)
  assert [len(scores) for scores in shared] == [len(exam) for exam in exams]
  for ours, expected in zip([s for scores in shared for s in scores], reference):
    assert ours.shape == (len(SHARED_OPTIONS),)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_shared_prefix_scores_on_a_mesh_equal_one_device():
  model, params, vocabulary = _family("bloom")
  prefixes, exams = _exam_workload()
  score = evaluate.jit_score_shared(model)
  one = evaluate.score_shared_examples(prefixes, exams, lambda *a: score(params, *a), vocabulary, batch_size=16,
                                       max_length=48)
  mesh = partitioning.make_mesh(1, -1, 1)
  _, sharded = convert.load_hf(str(FIXTURES / "hf_bloom_tiny"), mesh=mesh)
  sharded_score = evaluate.jit_score_shared(model, mesh)
  with partitioning.activation_rules(mesh):  # 8 prefix rows per call: filler prefixes and filler questions
    eight = evaluate.score_shared_examples(prefixes, exams, lambda *a: sharded_score(sharded, *a), vocabulary,
                                           batch_size=16, max_length=48,
                                           row_multiple=partitioning.data_parallel_size(mesh))
  assert one[4] == eight[4] == []
  for a, b in zip([s for scores in one for s in scores], [s for scores in eight for s in scores]):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_shared_prefix_errors_name_the_fix():
  _, _, vocabulary = _family("llama")
  exam = [evaluate.EvalExample(" Q: " + " ".join(WORDS) + "? A: The answer is (", ("A", "B"), 0, "0")]
  unused = lambda *a: pytest.fail("no batch should be scored")  # noqa: E731
  with pytest.raises(ValueError, match="more than max_length 16; raise max_length or shorten the question"):
    evaluate.score_shared_examples(["Worked example."], [exam], unused, vocabulary, batch_size=4, max_length=16)
  with pytest.raises(ValueError, match="2 prefixes but 1 exams"):
    evaluate.score_shared_examples(["a", "b"], [exam], unused, vocabulary, batch_size=4, max_length=16)
