"""Training checkpoints in MODEL_DIR: orbax `CheckpointManager` saves of the train state, data position and model.

  MODEL_DIR/checkpoints/<step>/state   train state (params, optimizer state, step), sharded arrays
  MODEL_DIR/checkpoints/<step>/data    {"mixture_or_task_name", "seed", "batches_consumed", "num_data_shards"}
  MODEL_DIR/checkpoints/<step>/model   the model config (`models.registry.config_to_dict`: family + fields)
  MODEL_DIR/input_state/<step>/shard-SSSSS-of-NNNNN.{index,data-*}
                                       each data shard's tf.data iterator at that step (`input_pipeline`), written
                                       by the process that reads the shard, before the step's orbax save starts
  MODEL_DIR/final_params/              a params checkpoint (`teacherlm_jax.checkpoints`) written when training ends

Saves are asynchronous and atomic: orbax writes a temporary directory and renames it when complete, so a save killed
half-way is never restored (restores take the latest finalised step). A step's input state is complete before its
orbax save begins, so a finalised step always has it; input states of steps no longer kept are deleted.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from teacherlm_jax import checkpoints
from teacherlm_jax.models import registry

CHECKPOINTS_DIR = "checkpoints"
INPUT_STATE_DIR = "input_state"
FINAL_PARAMS_DIR = checkpoints.FINAL_PARAMS_DIR

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
