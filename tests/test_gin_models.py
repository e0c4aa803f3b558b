"""gin/models/*.gin parse and build the published sizes of every family, and a tiny model of each."""

import pathlib

import gin
import jax
import pytest

from teacherlm_jax.models import common, registry

GIN_DIR = pathlib.Path(__file__).parent.parent / "gin" / "models"

# Parameter counts of the published checkpoints (Hugging Face model cards / num_parameters()).
PUBLISHED_PARAMS = {
    "bloom_560m": 559_214_592,
    "bloom_1b1": 1_065_314_304,
    "bloom_1b7": 1_722_408_960,
    "bloom_3b": 3_002_557_440,
    "bloom_7b1": 7_069_016_064,
    "bloom_176b": 176_247_271_424,
    "opt_125m": 125_239_296,
    "opt_350m": 331_196_416,
    "opt_1_3b": 1_315_758_080,
    "opt_2_7b": 2_651_596_800,
    "opt_6_7b": 6_658_473_984,
    "llama3_1b": 1_235_814_400,  # Llama-3.2-1B
    "llama3_8b": 8_030_261_248,  # Llama-3.1-8B
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_7b": 7_615_616_512,
    "mistral_7b": 7_241_732_096,  # Mistral-7B-v0.1
}
VOCAB_SIZES = {"bloom": 250880, "opt": 50272, "llama3": 128256, "qwen2_5_0_5b": 151936, "qwen2_5_7b": 152064,
               "mistral": 32000}


def _parse(name: str, *bindings: str):
  gin.clear_config()
  gin.parse_config_files_and_bindings([str(GIN_DIR / f"{name}.gin")], list(bindings))
  return gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_sizes(name):
  config = _parse(name, "TOKENIZER_PATH = 'unused'")
  vocab = next(size for prefix, size in VOCAB_SIZES.items() if name.startswith(prefix))
  assert config.vocab_size == vocab and config.dtype == "bfloat16" and config.param_dtype == "float32"
  shapes = jax.eval_shape(lambda key: common.init_params(registry.build(config), key, length=2), jax.random.key(0))
  assert common.count_params(shapes) == PUBLISHED_PARAMS[name]


def test_tiny_config_and_byte_vocabulary():
  config = _parse("tiny")
  assert (config.hidden_size, config.num_layers, config.num_heads, config.vocab_size) == (64, 2, 4, 512)
  vocabulary = gin.query_parameter("%VOCABULARY").scoped_configurable_fn()
  assert vocabulary.vocab_size <= config.vocab_size


@pytest.mark.parametrize("name,family", [("tiny_opt", "opt"), ("tiny_llama", "llama")])
def test_tiny_configs_of_the_other_families(name, family):
  config = _parse(name)
  assert registry.family(config).name == family and config.vocab_size == 512 and config.hidden_size == 64
  assert config.num_kv_heads == (2 if family == "llama" else 4)


@pytest.mark.parametrize("name", ["bloom_560m", "opt_1_3b", "llama3_8b"])
def test_published_configs_require_a_tokenizer_path(name):
  with pytest.raises(ValueError, match="TOKENIZER_PATH.*gin.REQUIRED"):
    _parse(name)
