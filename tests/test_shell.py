"""The command shell: gin files and bindings reach the configurable, results reach the report, and each way a run
stops has its exit code (SIGTERM checkpoint 143, clear error 1, unknown arguments 2)."""

import os
import signal

import gin
import pytest

from teacherlm_jax import shell


@gin.configurable("shell_test_command")
def _command(*, outcome: str = "ok", value: int = 0):
  if outcome == "preempted":
    raise shell.Preempted("SIGTERM: checkpointed step 3 in /tmp/run; rerun the same command to resume")
  if outcome == "nonfinite":
    raise shell.NonFiniteLoss("non-finite loss nan at step 2")
  if outcome == "bad_input":
    raise ValueError("data.jsonl line 3: field 'question' is missing")
  return {"value": value}


@pytest.mark.parametrize("outcome, code", [("ok", 0), ("preempted", 143), ("nonfinite", 1), ("bad_input", 1)])
def test_exit_codes_and_the_report(tmp_path, outcome, code):
  gin_file = tmp_path / "run.gin"
  gin_file.write_text("shell_test_command.value = 7\n")
  reported = []
  gin.clear_config()
  got = shell.run_entry_point(_command, [f"--gin_file={gin_file}", f"--gin.shell_test_command.outcome='{outcome}'"],
                              reported.append)
  assert got == code
  assert reported == ([{"value": 7}] if code == 0 else [])  # a run that stopped reports nothing
  gin.clear_config()


def test_unknown_arguments_exit_2_before_anything_runs(capsys):
  assert shell.run_entry_point(_command, ["--model_dir=/tmp/x"], lambda result: pytest.fail("ran")) == 2
  assert "unknown arguments ['--model_dir=/tmp/x']" in capsys.readouterr().err


def test_sigterm_only_sets_the_flag_inside_and_is_restored_after():
  before = signal.getsignal(signal.SIGTERM)
  with shell.sigterm_flag() as preempted:
    assert not preempted()
    os.kill(os.getpid(), signal.SIGTERM)
    assert preempted()
  assert signal.getsignal(signal.SIGTERM) == before
