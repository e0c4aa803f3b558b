"""Train step: mesh-shape invariance, gradient accumulation, loss math, schedules, weight-decay mask, sharded state."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from teacherlm_jax import partitioning, trainer
from teacherlm_jax.models import bloom, common, llama, opt, registry

CONFIG = bloom.BloomConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4)
MODEL = bloom.Bloom(CONFIG)
# One tiny model per family: OPT-350M's post-LN layout with a projected embedding, Llama with 2 K/V heads for 4.
FAMILY_CONFIGS = {
    "bloom": CONFIG,
    "opt": opt.OptConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_dim=48,
                         max_position_embeddings=32, word_embed_proj_dim=16, do_layer_norm_before=False),
    "llama": llama.LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                               rope_theta=500000.0),
}


def _batch(batch_size=8, length=16, seed=0, packed=False):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CONFIG.vocab_size, (batch_size, length + 1)).astype(np.int32)
  batch = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
           "decoder_loss_weights": (rng.random((batch_size, length)) > 0.3).astype(np.int32)}
  if packed:
    segments = np.repeat([[1] * (length // 2) + [2] * (length // 4) + [0] * (length // 4)], batch_size, axis=0)
    batch["decoder_segment_ids"] = segments.astype(np.int32)
    batch["decoder_positions"] = np.asarray(common.segment_positions(jnp.asarray(segments)), np.int32)
    batch["decoder_loss_weights"] = batch["decoder_loss_weights"] * (segments != 0)
  return batch


def _run(mesh_shape, steps, batch, accumulation_steps=1, optimizer_config=None, model=MODEL,
         rules=partitioning.DEFAULT_LOGICAL_AXIS_RULES):
  optimizer = trainer.make_optimizer(optimizer_config or trainer.OptimizerConfig(
      learning_rate=1e-2, warmup_steps=2, total_steps=steps, weight_decay=0.1))
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = partitioning.make_mesh(*mesh_shape, devices=devices)
  shardings = trainer.state_shardings(model, optimizer, mesh, rules)
  state = trainer.init_train_state(model, optimizer, jax.random.key(0), shardings)
  step = trainer.jit_train_step(model, optimizer, accumulation_steps, shardings, mesh, rules)
  losses = []
  with partitioning.activation_rules(mesh, rules):
    for _ in range(steps):
      state, metrics = step(state, trainer.global_batch(batch, trainer.batch_sharding(mesh)))
      losses.append(float(metrics["loss"]))
  return state, losses, metrics


def test_two_mesh_shapes_give_the_same_loss_trajectory():
  batch = _batch(packed=True)
  trajectories = [_run(shape, 8, batch)[1] for shape in [(8, 1, 1), (2, 2, 2)]]
  np.testing.assert_allclose(trajectories[1], trajectories[0], atol=1e-5)
  assert trajectories[0][-1] < trajectories[0][0] - 0.3  # it learns


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_every_family_trains_the_same_on_eight_devices_as_on_one(family):
  """data x fsdp x tensor = 2 x 2 x 2 (Llama's 2 K/V heads split over tensor=2) against a single device."""
  model, batch = registry.build(FAMILY_CONFIGS[family]), _batch(packed=True)
  one = _run((1, 1, 1), 6, batch, model=model)[1]
  eight = _run((2, 2, 2), 6, batch, model=model)[1]
  np.testing.assert_allclose(eight, one, atol=2e-5)
  assert one[-1] < one[0] - 0.1  # it learns


def test_grouped_kv_heads_that_do_not_divide_the_tensor_axis_are_refused_or_replicated():
  """2 K/V heads on tensor=4: the default rules refuse with the fix; replicated K/V trains as one device does."""
  model, batch = registry.build(FAMILY_CONFIGS["llama"]), _batch(packed=True)
  with pytest.raises(ValueError, match=r"k_proj_kernel.*2 key/value heads \(grouped-query attention\) cannot be split 4 "
                                       r"ways.*replicate_kv_heads"):
    _run((1, 2, 4), 1, batch, model=model)
  replicated = _run((1, 2, 4), 4, batch, model=model, rules=partitioning.replicate_kv_heads())[1]
  np.testing.assert_allclose(replicated, _run((1, 1, 1), 4, batch, model=model)[1], atol=2e-5)


def test_gradient_accumulation_4x2_equals_batch_of_8():
  batch = _batch(batch_size=8)
  whole, _, whole_metrics = _run((2, 1, 4), 3, batch, accumulation_steps=1)
  accumulated, _, accumulated_metrics = _run((2, 1, 4), 3, batch, accumulation_steps=4)
  # four micro-batches sum the gradient in another order: float rounding, amplified by Adam's normalisation, moves
  # a parameter by up to ~3e-6 after 3 steps; a wrong accumulation moves them by the learning rate (1e-2)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5), accumulated.params, whole.params)
  for key in ("loss", "accuracy", "tokens", "examples"):
    np.testing.assert_allclose(accumulated_metrics[key], whole_metrics[key], rtol=1e-6)


def test_loss_and_accuracy_are_averages_over_target_tokens():
  params = nn.unbox(common.init_params(MODEL, jax.random.key(1)))
  batch = _batch(batch_size=2, length=6)
  total, sums = trainer.loss_sums(MODEL, params, batch)
  logits = MODEL.apply({"params": params}, batch["decoder_input_tokens"])
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  weights = batch["decoder_loss_weights"]
  expected = 0.0
  correct = 0
  for b in range(2):
    for t in range(6):
      if weights[b, t]:
        expected -= log_probs[b, t, batch["decoder_target_tokens"][b, t]]
        correct += int(np.argmax(log_probs[b, t]) == batch["decoder_target_tokens"][b, t])
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  assert sums["tokens"] == weights.sum() and sums["correct_sum"] == correct and sums["examples"] == 2


def test_packed_batches_count_examples_by_segment():
  batch = _batch(batch_size=3, length=8, packed=True)
  assert float(trainer._count_examples(batch)) == 6  # two segments per row


@pytest.mark.parametrize("decay,at_end", [("cosine", 0.1), ("linear", 0.1), ("constant", 1.0)])
def test_learning_rate_schedules(decay, at_end):
  schedule = trainer.learning_rate_schedule(trainer.OptimizerConfig(
      learning_rate=1.0, warmup_steps=10, total_steps=110, decay=decay, end_learning_rate_factor=0.1))
  assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(110)) == pytest.approx(at_end, rel=1e-5)
  if decay == "cosine":
    assert float(schedule(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
  with pytest.raises(ValueError, match="decay="):
    trainer.OptimizerConfig(decay="step")


def test_weight_decay_skips_biases_and_layer_norms():
  params = nn.unbox(common.init_params(MODEL, jax.random.key(0)))
  mask = trainer._decay_mask(params)
  assert mask["word_embeddings"] and mask["h"]["mlp"]["wi_kernel"] and mask["h"]["self_attention"]["qkv_kernel"]
  assert not mask["h"]["mlp"]["wi_bias"] and not mask["ln_f"]["scale"]
  assert not mask["word_embeddings_layernorm"]["scale"] and not mask["h"]["input_layernorm"]["bias"]


def test_gradient_clipping_bounds_the_update():
  config = trainer.OptimizerConfig(learning_rate=1.0, total_steps=1, decay="constant", max_grad_norm=0.5)
  optimizer = trainer.make_optimizer(config)
  params = {"w_kernel": jnp.ones(3)}
  grads = {"w_kernel": jnp.array([30.0, 40.0, 0.0])}
  clipped, _ = optax.clip_by_global_norm(0.5).update(grads, optax.clip_by_global_norm(0.5).init(params))
  assert float(optax.tree.norm(clipped)) == pytest.approx(0.5)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  assert np.all(np.isfinite(np.asarray(updates["w_kernel"])))


def test_train_state_is_created_sharded_and_can_start_from_given_params():
  optimizer = trainer.make_optimizer(trainer.OptimizerConfig())
  mesh = partitioning.make_mesh(1, 4, 2)
  shardings = trainer.state_shardings(MODEL, optimizer, mesh)
  given = nn.unbox(common.init_params(MODEL, jax.random.key(7)))
  state = trainer.init_train_state(MODEL, optimizer, jax.random.key(0), shardings, params=given)
  kernel = state.params["h"]["mlp"]["wi_kernel"]  # [layers, embed, mlp]
  assert kernel.addressable_shards[0].data.shape == (2, 32 // 4, 128 // 2)
  np.testing.assert_array_equal(kernel, given["h"]["mlp"]["wi_kernel"])
  moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.shape == kernel.shape]
  assert moments and all(m.sharding.spec == kernel.sharding.spec for m in moments)
  assert int(state.step) == 0


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_model_flops_per_token_is_six_times_the_matmul_parameters_plus_attention(family):
  config = FAMILY_CONFIGS[family]
  params = common.count_params(jax.eval_shape(functools.partial(common.init_params, registry.build(config)),
                                              jax.random.key(0)))
  lookup = {"bloom": 0, "opt": (32 + 2) * 32, "llama": 64 * 32}[family]  # position table; Llama's untied embedding
  flops = trainer.model_flops_per_token(config, sequence_length=16)
  attention = 12 * config.num_layers * config.num_heads * config.head_dim * 16
  assert flops == 6 * (params - lookup) + attention
