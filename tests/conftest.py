"""Shared test setup: an 8-device CPU platform (set before jax is imported), a session compilation cache, fixture
paths, and the tiny curriculum the tests share."""

import os
import pathlib
import shutil
import tempfile

# 8 host devices for real meshes; LLVM's optimisation level 0 (the tests' tiny models are compile-bound: about 30%
# less time in total; outputs are checked against references with tolerances, never timed).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def pytest_configure(config):
  """One persistent compilation cache for the session (a fresh temporary directory): the many tests that build the
  same tiny models, engines and train steps compile each program once. Set on jax's config, not in the environment,
  so subprocess tests (multi-process runs) compile on their own and never share files."""
  import jax
  directory = tempfile.mkdtemp(prefix="teacherlm_jax_compile_cache_")
  config.stash[_CACHE_DIR] = directory
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
  directory = config.stash.get(_CACHE_DIR, None)
  if directory:
    shutil.rmtree(directory, ignore_errors=True)


_CACHE_DIR = pytest.StashKey[str]()


# The tiny curriculum the tests train (test_curriculum checks it, test_students annotates with its teachers).
CURRICULUM_FAST = {"STAGE1_STEPS": 4, "STAGE2_STEPS": 6, "STAGE3_STEPS": 2, "STAGE_WARMUP_STEPS": 1,
                   "TASK_FEATURE_LENGTHS": "{'inputs': 64, 'targets': 128}", "train.train.save_every": 2,
                   "train.train.log_every": 1}


def run_tiny_curriculum(model_dir) -> list[dict]:
  """gin/curriculum/tiny_cpu.gin with CURRICULUM_FAST into `model_dir`; the stage summaries."""
  import gin
  from teacherlm_jax import curriculum, gin_utils
  bindings = {**CURRICULUM_FAST, "MODEL_DIR": f"'{model_dir}'"}
  gin.clear_config()
  try:
    gin_utils.parse_gin([str(pathlib.Path(__file__).parents[1] / "gin" / "curriculum" / "tiny_cpu.gin")],
                        [f"{name}={value}" for name, value in bindings.items()])
    return gin.get_configurable(curriculum.run)()
  finally:
    gin.clear_config()


@pytest.fixture(scope="session")
def tiny_curriculum(tmp_path_factory) -> tuple[pathlib.Path, list[dict]]:
  """(<base>/curriculum, its stage summaries): one finished tiny curriculum for the session (read only)."""
  model_dir = tmp_path_factory.mktemp("shared") / "curriculum"
  return model_dir, run_tiny_curriculum(model_dir)


@pytest.fixture
def clean_task_config():
  """No gin binding, cached scan or discovered group leaks into (or out of) a test."""
  import gin
  from tasks import sources
  gin.clear_config()
  sources.clear_scan_cache()
  yield
  gin.clear_config()
  sources.clear_scan_cache()


@pytest.fixture
def hf_tiny_dir() -> pathlib.Path:
  """A tiny random Hugging Face BLOOM (6 heads, perturbed LayerNorms) saved by transformers as one safetensors."""
  return FIXTURES / "hf_bloom_tiny"


@pytest.fixture
def hf_tiny_sharded_dir() -> pathlib.Path:
  """The same model saved as 4 safetensors shards with `model.safetensors.index.json`."""
  return FIXTURES / "hf_bloom_tiny_sharded"


@pytest.fixture
def hf_reference() -> dict:
  """input_ids/attention_mask [4, 12] (full, left-padded, right-padded, left-padded rows) and transformers' logits."""
  from safetensors.numpy import load_file
  return load_file(str(FIXTURES / "hf_bloom_tiny_reference.safetensors"))


def tf_example(**features) -> bytes:
  """A serialized tf.train.Example; str/bytes values become bytes features, ints int64 features."""
  import tensorflow as tf
  feature = {}
  for name, value in features.items():
    if isinstance(value, int):
      feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    else:
      value = value.encode("utf-8") if isinstance(value, str) else value
      feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
