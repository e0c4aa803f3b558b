"""inspect_task prints rendered examples, token counts and truncation statistics."""

import subprocess
import sys

from teacherlm_jax import inspect_task


def test_token_stats_counts_truncation():
  examples = [{"inputs": [1] * 5, "targets": [1] * 2}, {"inputs": [1] * 12, "targets": [1] * 3}]
  stats = inspect_task.token_stats(examples, {"inputs": 10, "targets": 4})
  assert stats["inputs"] == {"examples": 2, "mean": 8.5, "p95": 11.65, "max": 12, "length": 10, "truncated": 1}
  assert stats["targets"]["truncated"] == 0


def test_describe_shows_rendered_text_of_a_mixture():
  report = inspect_task.describe("teacherlm_stage3_cot", "validation", n=2, lengths={"inputs": 64, "targets": 512},
                                 stats_examples=40)
  assert report.count("--- example") == 2
  assert "A: The answer is (" in report and "Let's think step by step." in report
  assert "token counts over 40 examples" in report
  assert "> 64:" in report and "truncated" in report


def test_command_line_with_gin_binding(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "teacherlm_jax.inspect_task", "--task", "teacherlm_p3_sense_3k", "--split", "train",
       "--n", "1", "--stats_examples", "100", "--feature_lengths", "inputs=32,targets=8",
       "--gin.caps.p3_sense_3k=5"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "token counts over 20 examples" in result.stdout  # 4 prompts x the cap of 5 and "--- example 0" in result.stdout
