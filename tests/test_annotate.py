"""The annotation loop end to end with the tiny Hugging Face BLOOM as teachers: output order and fields, per-record
equality with decoding the record alone, batch-size and process-count invariance, rejects, resume after SIGKILL."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from teacherlm_jax import annotate, annotation_inputs, annotation_store, checkpoints, convert, decoding, vocabularies

from conftest import FIXTURES

REPO = pathlib.Path(__file__).resolve().parents[1]
TEACHER = str(FIXTURES / "hf_bloom_tiny")
VOCABULARY = vocabularies.HfTokenizerVocabulary(str(FIXTURES / "hf_bloom_tiny" / "tokenizer.json"))
BAD_LINES = {3: b'{"question": "broken', 7: b'{"question": "caf\xe9?", "answer": "(A)"}', 11: b'{"answer": "(A)"}',
             15: b'{"question": "What?"}'}


def _input_file(path: pathlib.Path, ecqa: int = 14, creak: int = 8) -> str:
  """Embedded ECQA and CREAK records with bad lines at lines 4, 8, 12 and 16."""
  good = (REPO / "tasks/data/ecqa/test.jsonl").read_bytes().splitlines()[:ecqa]
  good += (REPO / "tasks/data/creak/validation.jsonl").read_bytes().splitlines()[:creak]
  lines = []
  for line in good:
    while len(lines) in BAD_LINES:
      lines.append(BAD_LINES[len(lines)])
    lines.append(line)
  path.write_bytes(b"\n".join(lines) + b"\n")
  return str(path)


def _config(input_path, output_dir, **overrides) -> annotate.AnnotationConfig:
  settings = dict(input=annotation_inputs.InputSpec(str(input_path)), output_dir=str(output_dir),
                  teachers=(("cot", TEACHER), ("fundamental", TEACHER)), max_input_length=160, max_new_tokens=6,
                  batch_size=8, chunk_size=8)
  settings.update(overrides)
  return annotate.AnnotationConfig(**settings)


def _lines(path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One complete greedy run: (config, summary)."""
  root = tmp_path_factory.mktemp("annotate")
  config = _config(_input_file(root / "input.jsonl"), root / "out")
  return config, annotate.run(config, VOCABULARY)


def test_every_record_once_in_input_order_with_the_release_fields(reference):
  config, summary = reference
  records, rejects = _lines(summary.output), _lines(summary.rejects)
  assert (summary.records, summary.annotated, summary.rejected) == (26, 22, 4)
  assert [r["provenance"]["index"] for r in records] == [i for i in range(26) if i not in BAD_LINES]
  assert [r["index"] for r in rejects] == sorted(BAD_LINES)
  source = pathlib.Path(config.input.source).read_bytes().splitlines()
  for record in records:
    original = json.loads(source[record["provenance"]["index"]])
    assert {k: record[k] for k in original} == original  # the input fields, untouched
    sample = annotation_inputs.sample(config.input, None, original)
    prompt = sample.prompt("cot")
    assert record["all"].startswith(prompt) and record["all"][len(prompt):].strip().startswith(record["cot"])
    assert record["all"].rstrip().endswith(record["fundamental"])
    assert " The fundamental of this question is:" in record["all"]
    teachers = record["provenance"]["teachers"]
    assert list(teachers) == ["cot", "fundamental"] and teachers["cot"]["checkpoint"] == TEACHER
    assert teachers["cot"]["new_tokens"] == 6 and teachers["cot"]["finish"] == "length"
    assert record["provenance"]["decoding"]["max_new_tokens"] == 6
  assert records[0]["provenance"]["source"] == f"{config.input.source} line 1"
  assert summary.new_tokens == {"cot": 6 * 22, "fundamental": 6 * 22}
  assert json.loads(pathlib.Path(config.output_dir, "summary.json").read_text())["annotated"] == 22


def test_each_record_equals_decoding_it_alone(reference, hf_tiny_dir):
  config, summary = reference
  model, params = convert.load_hf(str(hf_tiny_dir))
  generate = decoding.jit_generate(model, decoding.DecodingConfig(6, eos_id=VOCABULARY.eos_id))
  for record in _lines(summary.output)[::5]:
    original = {k: v for k, v in record.items() if k not in annotation_inputs.OUTPUT_FIELDS}
    for teacher, field in (("cot", "cot"), ("fundamental", "fundamental")):
      prompt = VOCABULARY.encode(annotation_inputs.sample(config.input, None, original).prompt(teacher))
      tokens, mask = decoding.left_pad([prompt], decoding.bucket_length(len(prompt), 160))  # few shapes to compile
      out, length = generate(params, tokens, mask, np.asarray([record["provenance"]["index"]], np.int32))
      assert record[field] == VOCABULARY.decode(out[0, :length[0]].tolist()).strip()


def test_engines_slots_tiers_batch_size_and_phases_do_not_change_the_output(reference, tmp_path):
  config, summary = reference  # the slot engine, 8 slots, one tier
  for name, overrides in [("static", dict(engine="static", batch_size=16, first_phase_tokens=2)),  # phases 2, 3, 5, 6
                          ("tiers", dict(batch_size=16, tiers=((8, 70), (8, 170)), steps_per_call=2, chunk_size=5))]:
    other = annotate.run(dataclasses.replace(config, output_dir=str(tmp_path / name), **overrides), VOCABULARY)
    assert pathlib.Path(other.output).read_bytes() == pathlib.Path(summary.output).read_bytes(), name
    assert pathlib.Path(other.rejects).read_bytes() == pathlib.Path(summary.rejects).read_bytes(), name
  with pytest.raises(ValueError, match="needs engine='slots'"):
    dataclasses.replace(config, engine="static", num_samples=2)


def test_k_samples_from_one_prefill_equal_k_separate_streams(reference, tmp_path):
  config, _ = reference
  sampled = dataclasses.replace(config, input=annotation_inputs.InputSpec(_input_file(tmp_path / "in.jsonl", 4, 3)),
                                temperature=1.0, seed=5, teachers=config.teachers[:1], chunk_size=4)
  summary = annotate.run(dataclasses.replace(sampled, output_dir=str(tmp_path / "k3"), num_samples=3), VOCABULARY)
  records = _lines(summary.output)
  assert [r["provenance"]["sample"] for r in records[:6]] == [0, 1, 2, 0, 1, 2]
  assert summary.annotated == 3 * 7 and summary.rejected == 2
  # Sample 0 is the one-sample stream; sample k >= 1 draws as the engine's stream (index, k) alone would.
  single = _lines(annotate.run(dataclasses.replace(sampled, output_dir=str(tmp_path / "k1")), VOCABULARY).output)
  assert [r["cot"] for r in records if r["provenance"]["sample"] == 0] == [r["cot"] for r in single]
  assert len({r["cot"] for r in records[:3]}) > 1  # the samples differ


def test_rejects_name_line_and_reason_and_long_prompts_follow_the_policy(reference, tmp_path):
  config, summary = reference
  rejects = {r["index"]: r for r in _lines(summary.rejects)}
  assert all(r["file"] == config.input.source and r["line"] == i + 1 for i, r in rejects.items())
  assert "invalid JSON" in rejects[3]["reason"] and "not valid UTF-8" in rejects[7]["reason"]
  assert (rejects[11]["field"], rejects[11]["reason"]) == ("question", "missing")
  assert (rejects[15]["field"], rejects[15]["reason"]) == ("answer", "missing")
  assert summary.reject_kinds == {"invalid JSON": 1, "not valid UTF-8": 1, "missing": 2}
  # The prompts are 92-142 tokens long: at max_input_length 104 some are too long.
  strict = annotate.run(dataclasses.replace(config, output_dir=str(tmp_path / "reject"), max_input_length=104,
                                            too_long="reject"), VOCABULARY)
  too_long = [r for r in _lines(strict.rejects) if "max_input_length 104" in r["reason"]]
  assert too_long and strict.annotated + strict.rejected == 26 and strict.rejected == 4 + len(too_long)
  cut = annotate.run(dataclasses.replace(config, output_dir=str(tmp_path / "cut"), max_input_length=104),
                     VOCABULARY)
  assert cut.annotated == 22 and cut.truncated_prompts == len(too_long)
  truncated = [r for r in _lines(cut.output)
               if any(t["truncated_prompt_tokens"] for t in r["provenance"]["teachers"].values())]
  assert sorted(r["provenance"]["index"] for r in truncated) == sorted(r["index"] for r in too_long)


def test_a_rerun_resumes_committed_chunks_and_refuses_other_settings(reference, tmp_path):
  config, summary = reference
  resumed = dataclasses.replace(config, output_dir=str(tmp_path / "out"))
  annotate.run(resumed, VOCABULARY)
  work = tmp_path / "out" / "work"
  for victim in (work / "cot" / "chunk-000001.p00000-of-00001.jsonl", work / "fundamental" /
                 "chunk-000003.p00000-of-00001.jsonl", tmp_path / "out" / "annotated.jsonl"):
    victim.unlink()
  (work / "cot" / ".chunk-000001.p00000-of-00001.jsonl.tmp-1").write_text('{"index": 8, "text": "half"')
  (work / "cot" / "chunk-000002.p00001-of-00002.jsonl").write_text("")  # half of a 2-process commit
  assert annotation_store.committed_chunks(str(tmp_path / "out"), "cot") == {0: 1, 2: 1, 3: 1}
  again = annotate.run(resumed, VOCABULARY)
  assert pathlib.Path(again.output).read_bytes() == pathlib.Path(summary.output).read_bytes()
  manifest = json.loads((tmp_path / "out" / "manifests" / "process-00000-of-00001.json").read_text())
  assert [(c["teacher"], c["chunk"]) for c in manifest["committed"][-2:]] == [("cot", 1), ("fundamental", 3)]
  with pytest.raises(ValueError, match="max_new_tokens: 6 before, 7 now"):
    annotate.run(dataclasses.replace(resumed, max_new_tokens=7), VOCABULARY)


def test_sampling_is_reproducible_per_record_and_stop_strings_cut(reference, tmp_path):
  config, _ = reference
  sampled = dataclasses.replace(config, temperature=1.0, teachers=(("cot", TEACHER),), max_new_tokens=8)
  one = annotate.run(dataclasses.replace(sampled, output_dir=str(tmp_path / "s8")), VOCABULARY)
  two = annotate.run(dataclasses.replace(sampled, output_dir=str(tmp_path / "s16"), batch_size=16,
                                         first_phase_tokens=3), VOCABULARY)
  assert pathlib.Path(one.output).read_bytes() == pathlib.Path(two.output).read_bytes()
  texts = [r["cot"] for r in _lines(one.output)]
  assert len(set(texts)) > len(texts) // 2  # records get their own samples
  other_seed = annotate.run(dataclasses.replace(sampled, output_dir=str(tmp_path / "seed1"), seed=1), VOCABULARY)
  assert [r["cot"] for r in _lines(other_seed.output)] != texts
  longest = max(range(len(texts)), key=lambda i: len(texts[i]))
  stop = texts[longest][len(texts[longest]) // 2:][:2]
  stopped = annotate.run(dataclasses.replace(sampled, output_dir=str(tmp_path / "stop"), stop_strings=(stop,)),
                         VOCABULARY)
  first = _lines(stopped.output)[longest]
  assert first["cot"] == texts[longest][:texts[longest].index(stop)].strip()
  assert first["provenance"]["teachers"]["cot"]["finish"] == "stop_string"
  assert all(stop not in r["cot"] for r in _lines(stopped.output))


def test_teachers_from_params_checkpoints_bring_their_vocabulary(tmp_path, hf_tiny_dir):
  convert.import_hf(str(hf_tiny_dir), str(tmp_path / "ckpt"))
  assert checkpoints.load_vocabulary(str(tmp_path / "ckpt")) == VOCABULARY
  input_path = _input_file(tmp_path / "input.jsonl", ecqa=3, creak=0)
  config = _config(input_path, tmp_path / "out", teachers=(("common_mistakes", str(tmp_path / "ckpt")),))
  summary = annotate.run(config)
  record = _lines(summary.output)[0]
  assert "error" in record and record["all"].startswith("Q: ") and "The common mistakes are:" in record["all"]
  byte_ckpt = tmp_path / "byte"
  checkpoints.save_params(str(byte_ckpt), checkpoints.load_params(str(tmp_path / "ckpt")),
                          checkpoints.load_config(str(tmp_path / "ckpt")), vocabulary=vocabularies.byte_vocabulary())
  assert json.loads((byte_ckpt / "vocabulary.json").read_text()) == {"kind": "byte"}
  mixed = _config(input_path, tmp_path / "mixed", teachers=(("cot", str(tmp_path / "ckpt")), ("fundamental",
                                                                                             str(byte_ckpt))))
  with pytest.raises(ValueError, match="uses another vocabulary"):
    annotate.run(mixed)
  with pytest.raises(ValueError, match="teachers must name some of"):
    _config(input_path, tmp_path / "x", teachers=(("socratic", TEACHER),))


def _command(input_path, output_dir, *extra):
  return [sys.executable, "-m", "teacherlm_jax.annotate", f"--gin_file={REPO}/gin/runs/annotate.gin",
          f"--gin.INPUT='{input_path}'", f"--gin.OUTPUT_DIR='{output_dir}'", f"--gin.TEACHERS={{'cot': '{TEACHER}', "
          f"'fundamental': '{TEACHER}'}}", "--gin.MAX_INPUT_LENGTH=160", "--gin.MAX_NEW_TOKENS=6",
          "--gin.BATCH_SIZE=8", "--gin.CHUNK_SIZE=8", *extra]


def test_two_processes_write_the_same_merged_output_as_one(reference, tmp_path):
  config, summary = reference
  env = {**os.environ, "PYTHONPATH": str(REPO), "LOG_DIR": str(tmp_path / "logs")}
  launched = subprocess.run([str(REPO / "launch" / "local.sh"), "2", "4"] +
                            _command(config.input.source, tmp_path / "two"), cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=env)
  logs = "\n".join(p.read_text()[-3000:] for p in sorted((tmp_path / "logs").glob("process_*.log")))
  assert launched.returncode == 0, launched.stdout + launched.stderr + logs
  assert (tmp_path / "two" / "annotated.jsonl").read_bytes() == pathlib.Path(summary.output).read_bytes()
  assert (tmp_path / "two" / "rejects.jsonl").read_bytes() == pathlib.Path(summary.rejects).read_bytes()
  parts = sorted(p.name for p in (tmp_path / "two" / "work" / "cot").iterdir())
  assert parts[:2] == ["chunk-000000.p00000-of-00002.jsonl", "chunk-000000.p00001-of-00002.jsonl"]
  assert sorted(p.name for p in (tmp_path / "two" / "manifests").iterdir()) == [
      "process-00000-of-00002.json", "process-00001-of-00002.json"]
  assert "annotated 22 of 26 records" in logs


def test_sigkill_then_restart_gives_the_uninterrupted_output(tmp_path):
  input_path = _input_file(tmp_path / "input.jsonl", ecqa=60, creak=40)
  expected = annotate.run(_config(input_path, tmp_path / "reference", chunk_size=4), VOCABULARY)
  output_dir = tmp_path / "killed"
  command = _command(input_path, output_dir, "--gin.CHUNK_SIZE=4")
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while time.time() < deadline and not list((output_dir / "work").glob("cot/chunk-00000[2-9]*.jsonl")):
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  assert not (output_dir / "annotated.jsonl").exists()  # killed mid-run
  committed = annotation_store.committed_chunks(str(output_dir), "cot")
  assert 3 <= len(committed) < 26
  restarted = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert f"teacher cot from {TEACHER}: {len(committed)} chunks already committed" in restarted.stderr
  assert (output_dir / "annotated.jsonl").read_bytes() == pathlib.Path(expected.output).read_bytes()
  assert (output_dir / "rejects.jsonl").read_bytes() == pathlib.Path(expected.rejects).read_bytes()
  assert "annotated 100 of 104 records" in restarted.stdout


def test_a_prompt_format_replaces_the_release_prompt_and_is_checked(tmp_path):
  sample = annotation_inputs.Sample("Is ice cold?  (A) yes (B) no", "(A)")
  config = _config(tmp_path / "in.jsonl", tmp_path / "out", prompt_format="Q: {question} A: Let's think step by step.")
  assert annotate.teacher_prompt(config, sample, "cot") == "Q: Is ice cold? (A) yes (B) no A: Let's think step by step."
  release = _config(tmp_path / "in.jsonl", tmp_path / "out")
  assert annotate.teacher_prompt(release, sample, "cot") == ("Q: Is ice cold? (A) yes (B) no A: The answer is (A). "
                                                             "Let's think step by step.")
  assert "prompt_format" not in release.settings() and config.settings()["prompt_format"].startswith("Q: {question}")
  for bad in ("Q: {q} A:", "{question} {letter}"):
    with pytest.raises(ValueError, match="needs {question} and may use {answer} and {trigger}"):
      _config(tmp_path / "in.jsonl", tmp_path / "out", prompt_format=bad)
