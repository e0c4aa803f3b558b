"""The demo's Hugging Face part: import, score, generate, export, re-import (its curriculum part is tested in
test_curriculum)."""

import json

from teacherlm_jax import demo


def test_demo_round_trips_and_writes_its_outputs(tmp_path):
  summary = demo.run(demo.DEFAULT_HF_DIR, tmp_path)
  assert summary["export_round_trip_bit_identical"] is True
  assert summary["params"] == 81_312 and len(summary["greedy_token_ids"]) == 12
  scores = list(summary["log_likelihoods"].values())
  assert all(score < 0 for score in scores) and len(set(scores)) == 3
  assert (tmp_path / "hf_export" / "config.json").exists() and (tmp_path / "params_checkpoint" / "teacherlm.json")
  assert json.loads((tmp_path / "demo.json").read_text())["outputs"]["hf_export"] == str(tmp_path / "hf_export")


def test_the_other_families_go_through_the_same_demo_path(tmp_path):
  for name, hf_dir in demo.OTHER_FAMILIES.items():
    summary = demo.run(hf_dir, tmp_path / hf_dir.name)
    assert summary["export_round_trip_bit_identical"] is True, name
    assert summary["model"]["family"] == {"OPT": "opt", "Llama 3": "llama"}[name]
    assert len(summary["greedy_token_ids"]) == 12 and len(set(summary["log_likelihoods"].values())) == 3
