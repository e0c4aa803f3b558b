"""Multi-process start-up: `jax.distributed.initialize` from flags, or automatically on TPU pods and SLURM.

  --coordinator_address=HOST:PORT --num_processes=N --process_id=I   explicit (GPU/CPU clusters, local tests)
  nothing, on a multi-host TPU VM or inside a multi-task SLURM job        detected by JAX itself
  nothing, elsewhere                                                      a single process; no initialisation
On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import jax


def distributed_flags(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """(the multi-process flags, the remaining arguments)."""
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  return parser.parse_known_args(list(argv))


def _auto_detected() -> bool:
  """A multi-host TPU slice or a multi-task SLURM job, which `jax.distributed.initialize()` configures itself."""
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
  return "," in tpu_hosts or slurm_tasks > 1


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Starts JAX's multi-process runtime when there is more than one process; a no-op otherwise."""
  explicit = coordinator_address is not None
  if not explicit and not _auto_detected():
    return
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
