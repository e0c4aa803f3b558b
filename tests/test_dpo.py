"""DPO: the loss against a hand computation, its gradient direction, sequence log-probabilities, pair encoding, and a
short run on the tiny teacher that raises the chosen log-ratio and resumes."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teacherlm_jax import checkpoints, convert, dpo, vocabularies
from teacherlm_jax.models import registry

from conftest import FIXTURES

VOCABULARY = vocabularies.HfTokenizerVocabulary(str(FIXTURES / "hf_bloom_tiny" / "tokenizer.json"))


def test_dpo_loss_equals_a_hand_computed_value():
  # pair 1: margin = 0.5 * ((-1 - -2) - (-3 - -2)) = 1; pair 2: margin = 0.5 * ((-4 - -3) - (-2 - -2)) = -0.5
  loss, metrics = dpo.dpo_loss(jnp.array([-1.0, -4.0]), jnp.array([-3.0, -2.0]), jnp.array([-2.0, -3.0]),
                               jnp.array([-2.0, -2.0]), beta=0.5)
  expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
  assert float(loss) == pytest.approx(expected, abs=1e-6)
  assert float(metrics["reward_accuracy"]) == 0.5 and float(metrics["reward_margin"]) == pytest.approx(0.25)
  assert float(metrics["chosen_reward"]) == pytest.approx((0.5 - 0.5) / 2)


def test_the_gradient_pushes_the_chosen_log_ratio_up():
  grads = jax.grad(lambda c, r: dpo.dpo_loss(c, r, jnp.zeros(1), jnp.zeros(1), 0.1)[0], argnums=(0, 1))(
      jnp.array([-2.0]), jnp.array([-2.0]))
  assert float(grads[0][0]) == pytest.approx(-0.1 * 0.5) and float(grads[1][0]) == pytest.approx(0.1 * 0.5)


def test_sequence_log_probs_sum_the_response_tokens(hf_tiny_dir):
  model, params = convert.load_hf(str(hf_tiny_dir))
  features = dpo.encode_pair({"prompt": "Q: Why? A:", "chosen": " Because.", "rejected": " No"}, VOCABULARY, 24)
  tokens, mask, weights = (features[f"chosen_{n}"][None] for n in ("tokens", "mask", "weights"))
  ours = float(dpo.sequence_log_probs(model, params, tokens, mask, weights)[0])
  length = int(mask.sum())
  log_probs = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, tokens[:, :length])[0], axis=-1))
  expected = sum(log_probs[t - 1, tokens[0, t]] for t in range(1, length) if weights[0, t])
  assert ours == pytest.approx(expected, abs=1e-4)
  prompt = VOCABULARY.encode("Q: Why? A:")
  assert weights[0, :len(prompt)].sum() == 0 and tokens[0, length - 1] == VOCABULARY.eos_id
  short = dpo.encode_pair({"prompt": "Q: Why? A:", "chosen": " Because.", "rejected": " No"}, VOCABULARY, 4)
  assert short["chosen_tokens"][-1] == VOCABULARY.eos_id and short["chosen_weights"].sum() >= 1  # keeps the end


def test_pairs_are_checked_and_batches_depend_only_on_the_step(tmp_path):
  path = tmp_path / "pairs.jsonl"
  path.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
  with pytest.raises(ValueError, match="line 1: field 'rejected'"):
    dpo.read_pairs(str(path))
  pairs = [{"prompt": f"p{i}", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(5)]
  run = dpo.batches(pairs, VOCABULARY, 2, 16, seed=3)
  first = [next(run) for _ in range(6)]
  resumed = next(dpo.batches(pairs, VOCABULARY, 2, 16, seed=3, start_step=4))
  jax.tree.map(np.testing.assert_array_equal, resumed, first[4])


def test_a_short_run_raises_the_chosen_log_ratio_and_resumes(tmp_path, hf_tiny_dir):
  convert.import_hf(str(hf_tiny_dir), str(tmp_path / "teacher"))
  pairs = [{"prompt": f"Q: Is {x} cold? A: The answer is (A). Let's think step by step.",
            "chosen": f" {x} is frozen water, so it is cold.", "rejected": " The sky is green."}
           for x in ("ice", "snow", "hail", "frost")]
  (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
  settings = dict(pairs=str(tmp_path / "pairs.jsonl"), initial_checkpoint_path=str(tmp_path / "teacher"),
                  beta=0.5, batch_size=4, sequence_length=48, learning_rate=1e-2, warmup_steps=0, save_every=2,
                  mesh_shape=(1, 4, 2))
  first = dpo.run(dpo.DpoConfig(model_dir=str(tmp_path / "dpo"), train_steps=4, **settings))
  resumed = dpo.run(dpo.DpoConfig(model_dir=str(tmp_path / "dpo"), train_steps=6, **settings))
  straight = dpo.run(dpo.DpoConfig(model_dir=str(tmp_path / "straight"), train_steps=6, **settings))
  assert resumed["reward_margin"] > first["reward_margin"] > 0 and resumed["reward_accuracy"] == 1.0
  assert resumed == pytest.approx(straight, rel=1e-5, abs=1e-6)
  model, reference = convert.load_model(str(tmp_path / "teacher"))
  policy = checkpoints.load_params(str(tmp_path / "dpo" / "final_params"))
  batch = {k: jnp.asarray(v) for k, v in next(dpo.batches(pairs, VOCABULARY, 4, 48, seed=0)).items()}
  policy_chosen, policy_rejected = dpo.pair_log_probs(model, policy, batch)
  reference_chosen, reference_rejected = dpo.pair_log_probs(model, reference, batch)
  assert np.all(np.asarray(policy_chosen - reference_chosen) > np.asarray(policy_rejected - reference_rejected))
  assert checkpoints.load_vocabulary(str(tmp_path / "dpo" / "final_params")) == VOCABULARY


def test_dpo_of_a_llama_family_teacher_on_the_same_loop(tmp_path):
  """Grouped-query attention (2 K/V heads on tensor=2), an untied head and a tokenizer that prepends BOS: the same
  DPO loop raises the chosen log-ratio, and the result is a Llama checkpoint."""
  convert.import_hf(str(FIXTURES / "hf_llama_tiny"), str(tmp_path / "teacher"))
  pairs = [{"prompt": f"Q: Is {x} cold? A:", "chosen": f" {x} is frozen water.", "rejected": " The sky is green."}
           for x in ("ice", "snow", "hail", "frost")]
  (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
  result = dpo.run(dpo.DpoConfig(model_dir=str(tmp_path / "dpo"), train_steps=4, pairs=str(tmp_path / "pairs.jsonl"),
                                 initial_checkpoint_path=str(tmp_path / "teacher"), beta=0.5, batch_size=4,
                                 sequence_length=48, learning_rate=1e-2, warmup_steps=0, save_every=2,
                                 mesh_shape=(1, 4, 2)))
  assert result["reward_margin"] > 0
  final = str(tmp_path / "dpo" / "final_params")
  assert registry.family(checkpoints.load_config(final)).name == "llama"
  assert checkpoints.load_vocabulary(final).add_bos
