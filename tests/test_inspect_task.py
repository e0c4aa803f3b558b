"""inspect_task prints rendered examples, token counts and truncation statistics, and the data sources."""

import json
import pathlib
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


def test_sources_lists_roots_groups_exclusions_and_writes_json(tmp_path):
  root = pathlib.Path(__file__).parent / "fixtures" / "corpora" / "p3_parquet"
  out = tmp_path / "sources.json"
  result = subprocess.run(
      [sys.executable, "-m", "teacherlm_jax.inspect_task", "--task", "teacherlm_stage1_multitask", "--sources",
       "--sources_json", str(out), f"--gin.data_root.p3_sense_3k='{root}'", "--gin.caps.p3_sense_3k=70"],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert f"root {root}, layout parquet, cap 70" in result.stdout
  assert "group p3/ecqa_pick_the_answer: 70 examples from 1 file(s) capped" in result.stdout
  assert "group p3/creak_claim_true_or_false: 60 examples from 1 file(s)\n" in result.stdout
  assert "excluded creak_claim_true_or_false_score_eval (tasks.config.selection)" in result.stdout
  assert "(embedded sample)" in result.stdout  # Muffin still reads the embedded sample
  account = json.loads(out.read_text())
  p3 = next(task for task in account["tasks"] if task["task"] == "teacherlm_p3_sense_3k")
  assert p3["examples"] == 130 and p3["rate"] == 130.0 and not p3["embedded"]
  assert [group["count"] for group in p3["groups"]] == [60, 70]
