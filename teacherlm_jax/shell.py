"""The command shell every gin entry point shares (train, curriculum, annotate, evaluate, students, dpo, lbt):
multi-process flags, logging, `jax.distributed`, gin files and `--gin.X=` bindings, the exit codes, and the
exceptions and SIGTERM flag a run stops with.

Exit codes of `run_entry_point`: 0 done; 143 after a SIGTERM checkpoint (`Preempted`: rerun the same command to
resume); 1 on a clear error (`NonFiniteLoss`, `ValueError`, `FileNotFoundError`: the log says what and where); 2 on
unknown arguments.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any, Callable, Optional, Sequence

import gin

from teacherlm_jax import distributed, gin_utils

log = logging.getLogger("teacherlm_jax")


class Preempted(Exception):
  """SIGTERM arrived: the state was checkpointed and the run stopped early."""


class NonFiniteLoss(FloatingPointError):
  """The loss or gradient norm became NaN or infinite; nothing non-finite was saved."""


class sigterm_flag:
  """Context manager: while inside, SIGTERM only sets a flag, which the loop reads as `preempted()`."""

  def __enter__(self):
    self._received = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return lambda: self._received

  def _handle(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM received: checkpointing at the end of this step")
    self._received = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)
    return False


def setup_logging() -> None:
  """teacherlm_jax messages at INFO on stderr; other libraries' (orbax, absl) at WARNING."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  if not log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False


def run_entry_point(configurable: Callable, argv: Optional[Sequence[str]],
                    report: Callable[[Any], None]) -> int:
  """The shared start of the gin entry points: multi-process flags, logging, jax.distributed, gin files and
  bindings; then calls `configurable` with its gin bindings, hands its result to `report`, and returns the exit code
  (143 after a SIGTERM checkpoint, 1 on a clear error, 2 on unknown arguments)."""
  flags, rest = distributed.distributed_flags(sys.argv[1:] if argv is None else argv)
  gin_files, bindings, rest = gin_utils.split_gin_args(rest)
  if rest:
    print(f"unknown arguments {rest}; use --gin_file=... and --gin.NAME=VALUE", file=sys.stderr)
    return 2
  setup_logging()
  distributed.initialize(flags.coordinator_address, flags.num_processes, flags.process_id)
  gin_utils.parse_gin(gin_files, bindings)
  try:
    result = gin.get_configurable(configurable)()
  except Preempted as stop:
    log.warning("%s", stop)
    return 143
  except (NonFiniteLoss, ValueError, FileNotFoundError) as error:
    log.error("%s", error)
    return 1
  report(result)
  return 0
