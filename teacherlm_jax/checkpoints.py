"""Parameter checkpoints: orbax-saved params plus the model config that built them.

Layout of a params checkpoint directory (what `convert import-hf` writes and training can start from):

  CKPT/params/          orbax `StandardCheckpointer` checkpoint of the params tree (atomic: written to a temporary
                        directory and renamed when complete)
  CKPT/teacherlm.json   {"model_config": {"family": "bloom" | "opt" | "llama", the config's fields} (no family: a
                        BLOOM config, as older checkpoints wrote), "hf_config": the Hugging Face config.json it came from
                        (or null), "source": free-form provenance}; written after the params, so a directory without
                        it is an incomplete save and is refused
  CKPT/tokenizer.json   (optional) the tokenizer and generation-config files that came with the model
  CKPT/vocabulary.json  (optional) {"kind": "byte"} or {"kind": "hf_tokenizer", "file": "tokenizer.json"}: the
                        vocabulary the model was trained with, so annotation and evaluation can pick it up

Paths may be local or any `etils.epath` / `tf.io.gfile` URL such as gs://.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
import seqio
from etils import epath

from teacherlm_jax import partitioning, vocabularies
from teacherlm_jax.models import common, registry

METADATA_FILE = "teacherlm.json"
PARAMS_DIR = "params"
FINAL_PARAMS_DIR = "final_params"  # a training run's params checkpoint, inside its MODEL_DIR
VOCABULARY_FILE = "vocabulary.json"
HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def save_params(path: str, params: Any, config: Any, *, hf_config: Optional[dict] = None,
                source: str = "", vocabulary: Optional[seqio.Vocabulary] = None) -> None:
  """Saves `params` (plain arrays, possibly sharded) and their config to `path`; returns when the save is complete.

  With `vocabulary` (a seqio.ByteVocabulary or a `vocabularies.HfTokenizerVocabulary`), it is recorded too.
  """
  directory = epath.Path(path)
  if (directory / METADATA_FILE).exists():
    raise FileExistsError(f"{directory} already holds a checkpoint ({METADATA_FILE}); choose a new path")
  if (directory / PARAMS_DIR).exists():
    raise FileExistsError(f"{directory / PARAMS_DIR} exists without {METADATA_FILE}: an interrupted save; delete "
                          f"{directory} and save again")
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(absolute_path(directory / PARAMS_DIR), params)
    checkpointer.wait_until_finished()
  metadata = {"model_config": registry.config_to_dict(config), "hf_config": hf_config, "source": source}
  if jax.process_index() == 0:
    if vocabulary is not None:
      save_vocabulary(str(directory), vocabulary)
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))


def resolve(path: str) -> str:
  """A params checkpoint directory, given it or a finished training run's MODEL_DIR (its final_params)."""
  final = epath.Path(path) / FINAL_PARAMS_DIR
  return str(final) if (final / METADATA_FILE).exists() else path


def read_metadata(path: str) -> dict:
  """The `teacherlm.json` of a params checkpoint, with a clear error when the directory is not one."""
  metadata_path = epath.Path(path) / METADATA_FILE
  if not metadata_path.exists():
    raise FileNotFoundError(f"{path} is not a complete params checkpoint: {metadata_path} is missing (an "
                            "interrupted save, or the wrong directory)")
  try:
    return json.loads(metadata_path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{metadata_path}: invalid JSON ({error})") from error


def load_config(path: str) -> Any:
  """The model config (of any family) stored with a params checkpoint."""
  return registry.config_from_dict(read_metadata(path)["model_config"])


def load_params(path: str, config: Optional[Any] = None, *, mesh: Optional[jax.sharding.Mesh] = None,
                rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES) -> Any:
  """Restores the params of a checkpoint, sharded on `mesh` by `rules` when a mesh is given.

  Args:
    path: a params checkpoint directory.
    config: the model the params are for; its shape fields must equal the stored config's (dtype, remat and
      scan_layers may differ: a change of scan_layers restacks the layers after the restore).
    mesh, rules: where to place the restored arrays; without a mesh they go to the default device.
  """
  stored = load_config(path)
  config = config or stored
  _check_same_model(path, stored, config)
  layout = registry.build(dataclasses.replace(stored, param_dtype=config.param_dtype))
  boxed = jax.eval_shape(lambda key: common.init_params(layout, key), jax.random.key(0))
  target = _abstract_target(boxed, mesh, rules)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(absolute_path(epath.Path(path) / PARAMS_DIR), target)
  if stored.scan_layers != config.scan_layers:
    params = registry.relayout_layers(config, params, scan_layers=config.scan_layers)
  return params


def _abstract_target(boxed: Any, mesh: Optional[jax.sharding.Mesh], rules: partitioning.LogicalAxisRules) -> Any:
  """Restore target: shapes/dtypes of the (boxed, abstract) params with the shardings to restore them into."""
  shapes = nn.unbox(boxed)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  else:
    shardings = partitioning.logical_shardings(boxed, mesh, rules)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _check_same_model(path: str, stored: Any, wanted: Any) -> None:
  have, want = registry.shape_fields(stored), registry.shape_fields(wanted)
  diff = {f: (have.get(f), want.get(f)) for f in sorted(set(have) | set(want)) if have.get(f) != want.get(f)}
  if diff:
    detail = ", ".join(f"{f}: checkpoint {a} vs requested {b}" for f, (a, b) in diff.items())
    raise ValueError(f"{path} holds a different model ({detail})")


def save_vocabulary(path: str, vocabulary: seqio.Vocabulary) -> None:
  """Records the vocabulary in `path/vocabulary.json` (copying the tokenizer file of a Hugging Face tokenizer, and
  the tokenizer_config.json beside it, which names its BOS / EOS)."""
  vocabulary = getattr(vocabulary, "resolved", vocabulary)  # tasks.registration.ConfiguredVocabulary
  if isinstance(vocabulary, seqio.ByteVocabulary):
    spec = {"kind": "byte"}
  elif isinstance(vocabulary, vocabularies.HfTokenizerVocabulary):
    source = epath.Path(vocabulary.tokenizer_path)
    for source_file, name in ((source, "tokenizer.json"),
                              (source.parent / vocabularies.TOKENIZER_CONFIG, vocabularies.TOKENIZER_CONFIG)):
      target = epath.Path(path) / name
      if source_file.exists() and not target.exists():
        target.write_bytes(source_file.read_bytes())
    spec = {"kind": "hf_tokenizer", "file": "tokenizer.json"}
  else:
    raise ValueError(f"cannot record vocabulary {vocabulary!r}: only byte and Hugging Face tokenizer vocabularies")
  (epath.Path(path) / VOCABULARY_FILE).write_text(json.dumps(spec))


def load_vocabulary(path: str) -> Optional[seqio.Vocabulary]:
  """The vocabulary recorded with a checkpoint (or a Hugging Face directory's tokenizer.json); None if neither."""
  directory = epath.Path(path)
  spec_path = directory / VOCABULARY_FILE
  spec = json.loads(spec_path.read_text()) if spec_path.exists() else {"kind": "hf_tokenizer",
                                                                       "file": "tokenizer.json"}
  if spec["kind"] == "byte":
    return vocabularies.byte_vocabulary()
  tokenizer = directory / spec["file"]
  return vocabularies.HfTokenizerVocabulary(str(tokenizer)) if tokenizer.exists() else None


def copy_tokenizer_files(source_dir: str, target_dir: str) -> list[str]:
  """Copies the Hugging Face tokenizer (and generation config) files found in `source_dir`; returns their names."""
  copied = []
  for name in HF_SIDE_FILES:
    source = epath.Path(source_dir) / name
    if source.exists():
      epath.Path(target_dir).mkdir(parents=True, exist_ok=True)
      (epath.Path(target_dir) / name).write_bytes(source.read_bytes())
      copied.append(name)
  return copied


def absolute_path(path: epath.Path) -> epath.Path:
  """orbax wants absolute paths: resolves local ones, keeps URLs (gs://...)."""
  return path if "://" in str(path) else epath.Path(str(path)).resolve()
