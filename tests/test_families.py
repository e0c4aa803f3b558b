"""Every model family against Hugging Face `transformers`, through the one model interface (`models.registry`).

Fixtures (tests/fixtures/make_hf_family_fixtures.py, transformers 5.24 + torch 2.13 CPU): tiny random, perturbed
checkpoints of OPT (pre-LN), OPT-350M's layout (post-LN, word_embed_proj_dim 32 != hidden 48), Llama 3 (6 heads over
2 K/V heads, llama3 rope_scaling, untied head), Qwen2 (q/k/v biases, 3 K/V heads, tied head) and Mistral (explicit
head_dim 16 != 48 / 4, sliding window 5 over 12-token rows), with transformers' logits, greedy continuations and
per-option log-likelihoods.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import numpy as np
import pytest
import safetensors.numpy

from teacherlm_jax import convert, decoding, evaluate, partitioning
from teacherlm_jax.models import common, llama, registry

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
NAMES = ["opt", "opt350", "llama", "qwen2", "mistral"]
FAMILY = {"opt": "opt", "opt350": "opt", "llama": "llama", "qwen2": "llama", "mistral": "llama"}


def _hf_dir(name: str) -> pathlib.Path:
  return FIXTURES / f"hf_{name}_tiny"


def _fixture(name: str, kind: str) -> dict:
  return safetensors.numpy.load_file(str(FIXTURES / f"hf_{name}_tiny_{kind}.safetensors"))


@functools.lru_cache(maxsize=None)
def _loaded(name: str):
  return convert.load_hf(str(_hf_dir(name)))


@pytest.mark.parametrize("name", NAMES)
def test_the_family_comes_from_model_type(name):
  model, params = _loaded(name)
  hf_config = json.loads((_hf_dir(name) / "config.json").read_text())
  assert registry.family(model.config).name == FAMILY[name]
  assert registry.num_params(model.config) == common.count_params(params)
  if FAMILY[name] == "llama":
    assert model.config.hf_model_type == hf_config["model_type"]


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_with_left_and_right_padding(name):
  model, params = _loaded(name)
  reference = _fixture(name, "reference")
  logits = np.asarray(jax.jit(model.apply)({"params": params}, reference["input_ids"], reference["attention_mask"]))
  real = reference["attention_mask"].astype(bool)
  np.testing.assert_allclose(logits[real], reference["logits"][real], atol=1e-4)
  # each padded row equals the same tokens run alone, unpadded
  np.testing.assert_allclose(logits[real], reference["logits_unpadded"][real], atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_decoding_with_the_cache_equals_generate(name):
  """decoding.generate (per-layer cache, phases of 4 then 6 tokens) gives transformers' tokens, for an unpadded and
  a left-padded prompt; each step's logits equal generate's within 1e-4."""
  model, params = _loaded(name)
  greedy = _fixture(name, "greedy")
  prompts, mask, expected = greedy["prompt_ids"], greedy["prompt_mask"], greedy["generated_ids"]
  eos = json.loads((_hf_dir(name) / "config.json").read_text())["eos_token_id"]
  config = decoding.DecodingConfig(max_new_tokens=expected.shape[1], eos_id=eos, first_phase_tokens=4)
  tokens, lengths = decoding.jit_generate(model, config)(params, prompts, mask, np.arange(2, dtype=np.int32))
  np.testing.assert_array_equal(tokens, expected)
  np.testing.assert_array_equal(lengths, [expected.shape[1]] * 2)

  step_model, step_params = decoding.per_layer(model, params)
  apply = jax.jit(functools.partial(step_model.apply, decode=True, mutable=["cache"]))
  cache = common.init_cache(step_model, 2, prompts.shape[1] + expected.shape[1])
  logits, state = apply({"params": step_params, "cache": cache}, prompts, mask)
  step_logits = [logits[:, -1]]
  for i in range(expected.shape[1] - 1):
    logits, state = apply({"params": step_params, "cache": state["cache"]}, expected[:, i:i + 1])
    step_logits.append(logits[:, -1])
  np.testing.assert_allclose(np.stack(step_logits, 1), greedy["step_logits"], atol=1e-4)


@pytest.mark.parametrize("name,rules", [("llama", partitioning.DEFAULT_LOGICAL_AXIS_RULES),
                                        ("qwen2", partitioning.replicate_kv_heads())])
def test_sharded_decoding_of_grouped_kv_heads(name, rules):
  """On a (data 1, fsdp 2, tensor 2) mesh: Llama's 2 K/V heads split over tensor=2; Qwen2's 3 do not divide it, so
  the default rules refuse and replicated K/V heads decode the same tokens as one device."""
  model, params = _loaded(name)
  greedy = _fixture(name, "greedy")
  eos = json.loads((_hf_dir(name) / "config.json").read_text())["eos_token_id"]
  config = decoding.DecodingConfig(max_new_tokens=greedy["generated_ids"].shape[1], eos_id=eos, first_phase_tokens=4)
  mesh = partitioning.make_mesh(1, 2, 2, devices=jax.devices()[:4])
  if name == "qwen2":
    with pytest.raises(ValueError, match="3 key/value heads .* cannot be split 2 ways.*replicate_kv_heads"):
      decoding.jit_generate(model, config, mesh=mesh)
  sharded = partitioning.shard_host_arrays(params, partitioning.logical_shardings(
      jax.eval_shape(functools.partial(common.init_params, model), jax.random.key(0)), mesh, rules))
  with partitioning.activation_rules(mesh, rules):
    tokens, _ = decoding.jit_generate(model, config, mesh=mesh, rules=rules)(
        sharded, greedy["prompt_ids"], greedy["prompt_mask"], np.arange(2, dtype=np.int32))
  np.testing.assert_array_equal(tokens, greedy["generated_ids"])


@pytest.mark.parametrize("name", NAMES)
def test_option_log_likelihoods_equal_transformers(name):
  """evaluate's rank-classification scorer (contexts left-padded in one batch, options through the KV cache)."""
  model, params = _loaded(name)
  cases = json.loads((FIXTURES / f"hf_{name}_tiny_options.json").read_text())
  tokens, mask = decoding.left_pad([case["context_ids"] for case in cases])
  num_options = max(len(case["option_ids"]) for case in cases)
  length = max(len(ids) for case in cases for ids in case["option_ids"])
  options, option_mask = evaluate.option_arrays([case["option_ids"] for case in cases], num_options, length)
  scores = evaluate.jit_score(model)(params, tokens, mask, options, option_mask)
  for row, case in enumerate(cases):
    np.testing.assert_allclose(scores[row, :len(case["log_likelihoods"])], case["log_likelihoods"], atol=1e-4)


def _tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("name", NAMES)
def test_import_export_import_is_bit_identical(tmp_path, name):
  """import-hf -> export-hf writes transformers' own tensor names and bytes (a tied head is left out, as
  transformers saves it) and a config.json that reads back as the same model."""
  convert.import_hf(str(_hf_dir(name)), str(tmp_path / "ckpt"))
  convert.export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
  original, exported = _tensors(_hf_dir(name)), _tensors(tmp_path / "hf")
  assert sorted(exported) == sorted(original)
  for key, array in original.items():
    assert exported[key].dtype == array.dtype and exported[key].tobytes() == array.tobytes(), key
  config = convert.config_from_hf(convert.read_hf_config(str(tmp_path / "hf")))
  assert config == _loaded(name)[0].config
  reimported = convert.load_hf(str(tmp_path / "hf"))[1]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), reimported,
               _loaded(name)[1])
  for file_name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "hf" / file_name).read_bytes() == (_hf_dir(name) / file_name).read_bytes()


def test_opt_350m_layout_projects_and_has_no_final_layer_norm():
  model, params = _loaded("opt350")
  assert model.config.word_embed_proj_dim == 32 and not model.config.do_layer_norm_before
  assert params["embed_tokens"].shape == (512, 32) and params["project_in"].shape == (32, 48)
  assert "final_layer_norm" not in params and "final_layer_norm" in params["layers"]


def test_llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones():
  """Llama 3.1's bands (original context 16 here): wavelengths under 16 / 4 unchanged, over 16 / 1 divided by 8,
  smooth in between; `rope_type: default` is plain RoPE."""
  scaled = llama.LlamaConfig(hidden_size=48, num_heads=6, num_kv_heads=2, rope_theta=500000.0,
                             rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_original_max_positions=16)
  plain = llama.rope_frequencies(llama.LlamaConfig(hidden_size=48, num_heads=6, rope_theta=500000.0))
  frequencies, wavelengths = llama.rope_frequencies(scaled), 2 * np.pi / plain
  np.testing.assert_allclose(frequencies[wavelengths < 4], plain[wavelengths < 4], rtol=1e-6)
  np.testing.assert_allclose(frequencies[wavelengths > 16], plain[wavelengths > 16] / 8, rtol=1e-6)
  assert np.all(frequencies <= plain)


def test_grouped_query_config_errors_name_the_fix():
  with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
    llama.LlamaConfig(hidden_size=48, num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
    llama.config_from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 8,
                          "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})
  with pytest.raises(ValueError, match="rope scaling 'llama3' needs 'low_freq_factor'"):
    llama.config_from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 8,
                          "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
