"""Real multi-process training on localhost (jax.distributed, gloo): 2 processes x 2 CPU devices = 1 x 4."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

from teacherlm_jax import checkpoints, distributed

REPO = pathlib.Path(__file__).resolve().parents[1]


def _train_command(model_dir):
  return [sys.executable, "-m", "teacherlm_jax.train", f"--gin_file={REPO}/gin/runs/train.gin",
          f"--gin_file={REPO}/gin/models/tiny.gin", "--gin.MIXTURE_OR_TASK_NAME='teacherlm_stage2_personalization'",
          f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=6", "--gin.WARMUP_STEPS=2",
          "--gin.LEARNING_RATE=3e-3", "--gin.BATCH_SIZE=8", "--gin.DATA_SHARDS=4",
          "--gin.TASK_FEATURE_LENGTHS={'inputs':64,'targets':192}", "--gin.train.save_every=3"]


def test_two_processes_train_to_the_same_parameters_as_one(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  single = subprocess.run(_train_command(tmp_path / "one"), cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert single.returncode == 0, single.stderr[-3000:]
  logs = tmp_path / "logs"
  launched = subprocess.run([str(REPO / "launch" / "local.sh"), "2", "2"] + _train_command(tmp_path / "two"),
                            cwd=REPO, capture_output=True, text=True, timeout=600, env={**env, "LOG_DIR": str(logs)})
  process_logs = "\n".join(p.read_text()[-2000:] for p in sorted(logs.glob("process_*.log")))
  assert launched.returncode == 0, launched.stdout + launched.stderr + process_logs
  assert "launched 2 processes" in launched.stdout
  one = checkpoints.load_params(str(tmp_path / "one" / "final_params"))
  two = checkpoints.load_params(str(tmp_path / "two" / "final_params"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), one, two)
  checkpoints_written = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit())
  assert checkpoints_written[-1] == "6"


def test_distributed_flags_and_single_process_default(monkeypatch):
  flags, rest = distributed.distributed_flags(["--coordinator_address=h:1", "--num_processes=2", "--process_id=1",
                                               "--gin.X=1"])
  assert (flags.coordinator_address, flags.num_processes, flags.process_id, rest) == ("h:1", 2, 1, ["--gin.X=1"])
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  distributed.initialize()  # one process: nothing to start
  assert jax.process_count() == 1
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed._auto_detected()
