"""gin/models/*.gin parse and build the published BLOOM sizes."""

import pathlib

import gin
import jax
import pytest

from teacherlm_jax.models import bloom, common, registry

GIN_DIR = pathlib.Path(__file__).parent.parent / "gin" / "models"

# Parameter counts of the published checkpoints (Hugging Face model cards / num_parameters()).
PUBLISHED_PARAMS = {
    "bloom_560m": 559_214_592,
    "bloom_1b1": 1_065_314_304,
    "bloom_1b7": 1_722_408_960,
    "bloom_3b": 3_002_557_440,
    "bloom_7b1": 7_069_016_064,
    "bloom_176b": 176_247_271_424,
}


def _parse(name: str, *bindings: str):
  gin.clear_config()
  gin.parse_config_files_and_bindings([str(GIN_DIR / f"{name}.gin")], list(bindings))
  return gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_sizes(name):
  config = _parse(name, "TOKENIZER_PATH = 'unused'")
  assert config.vocab_size == 250880 and config.dtype == "bfloat16" and config.param_dtype == "float32"
  shapes = jax.eval_shape(lambda key: common.init_params(bloom.Bloom(config), key, length=2), jax.random.key(0))
  assert common.count_params(shapes) == PUBLISHED_PARAMS[name]


def test_tiny_config_and_byte_vocabulary():
  config = _parse("tiny")
  assert (config.hidden_size, config.num_layers, config.num_heads, config.vocab_size) == (64, 2, 4, 512)
  vocabulary = gin.query_parameter("%VOCABULARY").scoped_configurable_fn()
  assert vocabulary.vocab_size <= config.vocab_size


def test_bloom_configs_require_a_tokenizer_path():
  with pytest.raises(ValueError, match="TOKENIZER_PATH.*gin.REQUIRED"):
    _parse("bloom_560m")
