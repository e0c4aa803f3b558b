"""A training run's MODEL_DIR: its layout, where a run starts, its checkpoints, config.gin and final_params.

Every objective of `train_loop` (LM training in `train`, DPO in `dpo`) lives in a MODEL_DIR through `ModelDir`:

  MODEL_DIR/checkpoints/<step>/state   train state (params, optimizer state, step), sharded arrays
  MODEL_DIR/checkpoints/<step>/data    the batch source's `state()` at that step (JSON), e.g. the LM input's
                                       {"mixture_or_task_name", "seed", "batches_consumed", "num_data_shards"}
  MODEL_DIR/checkpoints/<step>/model   the model config (`models.registry.config_to_dict`: family + fields)
  MODEL_DIR/input_state/<step>/shard-SSSSS-of-NNNNN.{index,data-*}
                                       each data shard's tf.data iterator at that step (`input_pipeline`), written
                                       by the process that reads the shard, before the step's orbax save starts
  MODEL_DIR/config.gin                 the operative gin config of the run
  MODEL_DIR/final_params/              a params checkpoint (`teacherlm_jax.checkpoints`, with the vocabulary) written
                                       when training ends; its source "<MODEL_DIR> step <N>" says which step it is

Where a run starts (`ModelDir.start`): MODEL_DIR holds a checkpoint -> resume the train state and the batch source's
state of the latest one (another model's checkpoints are an error); else an initial params checkpoint -> its params
with a fresh optimizer state at step 0; else a fresh seeded initialisation.

Saves are asynchronous and atomic: orbax writes a temporary directory and renames it when complete, so a save killed
half-way is never restored (restores take the latest finalised step). A step's input state is complete before its
orbax save begins, so a finalised step always has it; input states of steps no longer kept are deleted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import gin
import jax
import orbax.checkpoint as ocp
import seqio
from etils import epath
from jax.experimental import multihost_utils

from teacherlm_jax import checkpoints, trainer
from teacherlm_jax.models import registry

CHECKPOINTS_DIR = "checkpoints"
INPUT_STATE_DIR = "input_state"
FINAL_PARAMS_DIR = checkpoints.FINAL_PARAMS_DIR
CONFIG_FILE = "config.gin"


def final_params_source(model_dir: str, step: int) -> str:
  """The provenance string MODEL_DIR/final_params records: which run and step the params are."""
  return f"{model_dir} step {step}"


def manager(model_dir: str, save_interval_steps: int, max_to_keep: Optional[int]) -> ocp.CheckpointManager:
  """The run's checkpoint manager (async saves every `save_interval_steps`, keeping the last `max_to_keep`)."""
  options = ocp.CheckpointManagerOptions(save_interval_steps=save_interval_steps, max_to_keep=max_to_keep,
                                         create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoints.absolute_path(epath.Path(model_dir) / CHECKPOINTS_DIR), options=options,
                               item_names=("state", "data", "model"))


def save(checkpoint_manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         config: Any, force: bool = False) -> bool:
  """Starts an asynchronous save of `step` if it is due (or `force`); returns whether one started."""
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                            model=ocp.args.JsonSave(registry.config_to_dict(config)))
  return checkpoint_manager.save(step, args=args, force=force)


def stored_model(checkpoint_manager: ocp.CheckpointManager, step: int) -> dict:
  """The model config fields stored with `step`."""
  return checkpoint_manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]


def check_same_model(model_dir: str, stored: dict, config: Any) -> None:
  """Refuses to resume a MODEL_DIR that holds another model's checkpoints."""
  wanted = registry.shape_fields(config)
  have = registry.shape_fields(registry.config_from_dict(stored))
  diff = [f"{field}: checkpoint {have.get(field)} vs configured {wanted.get(field)}"
          for field in sorted(set(have) | set(wanted)) if have.get(field) != wanted.get(field)]
  if diff:
    raise ValueError(f"MODEL_DIR {model_dir} holds checkpoints of a different model ({'; '.join(diff)}); use a new "
                     "MODEL_DIR, or INITIAL_CHECKPOINT_PATH to start from another run")


def restore(checkpoint_manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """(train state laid out like `abstract_state`, data position) of `step`."""
  restored = checkpoint_manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def abstract_like(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with shardings: the restore target of a sharded tree."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def input_state_dir(model_dir: str, step: int) -> str:
  """Where the data shards' iterator states of `step` are."""
  return str(epath.Path(model_dir) / INPUT_STATE_DIR / str(step))


def prune_input_states(model_dir: str, keep: set[int]) -> None:
  """Deletes the input states of steps not in `keep` (process 0; no process writes to an old step again)."""
  root = epath.Path(model_dir) / INPUT_STATE_DIR
  if jax.process_index() != 0 or not root.exists():
    return
  for child in root.iterdir():
    if child.name.isdigit() and int(child.name) not in keep:
      child.rmtree()


@dataclasses.dataclass(frozen=True)
class Start:
  """Where a run starts: its train state, the batch source's saved state (None unless resumed), a sentence for the
  log."""

  state: trainer.TrainState
  data_state: Optional[dict]
  description: str


class ModelDir:
  """One run's MODEL_DIR (the layout above): where the run starts, its checkpoints, config.gin and final_params.

  A batch source saved with a checkpoint has `state() -> dict` (JSON, stored in checkpoints/<step>/data) and,
  optionally, `save(directory)` (its iterator states, stored in input_state/<step> when `save_input_states`).
  """

  def __init__(self, path: str, model_config: Any, vocabulary: Optional[seqio.Vocabulary], *, save_every: int,
               keep_checkpoints: Optional[int], save_input_states: bool = True):
    self.path, self.model_config, self.vocabulary = str(path), model_config, vocabulary
    self.save_input_states = save_input_states
    self.manager = manager(self.path, save_every, keep_checkpoints)

  def start(self, model: Any, optimizer: Any, shardings: trainer.TrainState, *, seed: int,
            initial_checkpoint_path: Optional[str] = None,
            load_params: Optional[Callable[[str], Any]] = None) -> Start:
    """Resume the latest checkpoint; else `load_params(resolved initial_checkpoint_path)` with a fresh optimizer
    state; else fresh params from `seed`."""
    latest = self.manager.latest_step()
    if latest is not None:
      check_same_model(self.path, stored_model(self.manager, latest), self.model_config)
      abstract = abstract_like(trainer.abstract_train_state(model, optimizer), shardings)
      state, data_state = restore(self.manager, latest, abstract)
      return Start(state, data_state, f"resuming {self.path} from its checkpoint at step {latest}")
    key = jax.random.key(seed)
    if initial_checkpoint_path:
      path = checkpoints.resolve(initial_checkpoint_path)
      state = trainer.init_train_state(model, optimizer, key, shardings, params=load_params(path))
      return Start(state, None, f"initialising params from {path} (INITIAL_CHECKPOINT_PATH; fresh optimizer state, "
                                "step 0)")
    state = trainer.init_train_state(model, optimizer, key, shardings)
    return Start(state, None, f"fresh initialisation of {self.path} (seed {seed})")

  def write_config(self) -> None:
    """MODEL_DIR/config.gin: the operative gin config (all bindings when nothing was called through gin yet)."""
    if jax.process_index() == 0:
      epath.Path(self.path).mkdir(parents=True, exist_ok=True)
      (epath.Path(self.path) / CONFIG_FILE).write_text(gin.operative_config_str() or gin.config_str())

  def save(self, step: int, state: Any, batches: Any) -> None:
    """The batch source's iterator states (synchronously), then the step's orbax save (asynchronously); prunes the
    input states of steps no longer kept."""
    if self.save_input_states and hasattr(batches, "save"):
      batches.save(input_state_dir(self.path, step))
    save(self.manager, step, state, batches.state(), self.model_config, force=True)
    prune_input_states(self.path, set(self.manager.all_steps()) | {step})

  def finish(self, state: Any, batches: Any) -> None:
    """Saves the last step (unless saved), waits for every save, and writes final_params once per final step (an
    earlier, shorter run's are replaced)."""
    step = int(state.step)
    if self.manager.latest_step() != step:
      self.save(step, state, batches)
    self.manager.wait_until_finished()
    final = epath.Path(self.path) / FINAL_PARAMS_DIR
    source = final_params_source(self.path, step)
    if (final / checkpoints.METADATA_FILE).exists() and checkpoints.read_metadata(str(final))["source"] == source:
      return
    if jax.process_index() == 0 and final.exists():
      final.rmtree()
    multihost_utils.sync_global_devices("teacherlm_final_params")
    checkpoints.save_params(str(final), state.params, self.model_config, source=source, vocabulary=self.vocabulary)
