"""`make demo`: the project end to end on the embedded tiny default.

1. Hugging Face interop: imports a tiny random Hugging Face BLOOM (the committed fixture, made by transformers) into
   a params checkpoint, scores a few ECQA-style sentences, greedily continues a prompt with the KV cache, and exports
   the checkpoint back to the Hugging Face format (the weights are random, so the continuation is gibberish); then
   the same for a tiny OPT (OPT-350M's layout) and a tiny Llama 3 (grouped-query attention), through the same code.
2. The TeacherLM curriculum (gin/curriculum/tiny_cpu.gin) on the embedded samples with the tiny model: multi-task,
   personalization and the three teachers, showing the loss of every stage.
3. Annotation: the three tiny teachers annotate embedded CREAK and ECQA samples (`teacherlm_jax.annotate`), and a
   few annotated records are printed (a tiny model trained for a minute writes mostly noise; the point is the
   pipeline).
4. Students (`teacherlm_jax.students`): tiny students trained on the annotated samples, the answer-only baseline and
   the augmented variants, multi-task then fine-tuned on CREAK, evaluated by rank classification on CREAK and ECQA;
   beside the BLOOM students, tiny OPT students (the paper's student family, gin/models/tiny_opt.gin) on the
   answer-only and all-fields variants.
5. Learning by teaching (`teacherlm_jax.lbt`): the CoT teacher solves a few CREAK questions without their answers
   (K samples), the answer-only student's exam accuracy scores each candidate, every selection method's answer
   accuracy is printed, and the teacher gets a few DPO steps on the correctness+lbt pairs.
6. The report (`teacherlm_jax.report`): Markdown + PNG plots of all of the above; its path is printed.

  python -m teacherlm_jax.demo --out outputs/demo [--skip_curriculum]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from teacherlm_jax import checkpoints, convert, shell, vocabularies
from teacherlm_jax.models import common, registry

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_HF_DIR = REPO / "tests" / "fixtures" / "hf_bloom_tiny"
OTHER_FAMILIES = {"OPT": REPO / "tests" / "fixtures" / "hf_opt350_tiny",
                  "Llama 3": REPO / "tests" / "fixtures" / "hf_llama_tiny"}
OPT_STUDENT_VARIANTS = ["answer_only", "all"]
SENTENCES = (
    "Q: What kind of people will someone who is in charge of project look for? A: The answer is (C).",
    "Q: What kind of people will someone who is in charge of project look for? A: The answer is (A).",
    "Determine the correctness of the following sentence. Eating soup means eating only solids.",
)
PROMPT = "Q: Where would you put a plate after washing it? A:"


def sequence_log_likelihoods(model: nn.Module, params: dict, token_rows: list[list[int]]) -> np.ndarray:
  """Sum of log p(token_t | tokens_<t) over each row (right-padded batch) -> [rows]."""
  length = max(len(row) for row in token_rows)
  tokens = np.zeros((len(token_rows), length), np.int32)
  mask = np.zeros_like(tokens)
  for i, row in enumerate(token_rows):
    tokens[i, :len(row)], mask[i, :len(row)] = row, 1
  logits = jax.jit(model.apply)({"params": params}, tokens, mask)
  log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
  return np.asarray((picked * mask[:, 1:]).sum(axis=1))


def greedy_continuation(model: nn.Module, params: dict, prompt: list[int], new_tokens: int) -> list[int]:
  """Greedy decoding with the KV cache: one prefill call, then one call per new token."""
  @jax.jit
  def step(cache, tokens):
    logits, state = model.apply({"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"])
    return jnp.argmax(logits[:, -1], axis=-1)[:, None], state["cache"]

  cache = common.init_cache(model, 1, len(prompt) + new_tokens)
  token, cache = step(cache, jnp.asarray([prompt], jnp.int32))
  generated = [int(token[0, 0])]
  for _ in range(new_tokens - 1):
    token, cache = step(cache, token)
    generated.append(int(token[0, 0]))
  return generated


def run_curriculum(out: pathlib.Path) -> list[dict]:
  """The tiny curriculum into `out` (gin/curriculum/tiny_cpu.gin); one summary per stage."""
  import gin
  from teacherlm_jax import curriculum, gin_utils
  gin.clear_config()
  gin_utils.parse_gin([str(REPO / "gin" / "curriculum" / "tiny_cpu.gin")], [f"MODEL_DIR = '{out}'"])
  return gin.get_configurable(curriculum.run)()


def annotate_samples(curriculum_dir: pathlib.Path, out: pathlib.Path, per_dataset: int = 48) -> dict:
  """Annotates the first `per_dataset` embedded CREAK and ECQA training records with the three tiny teachers,
  sampling as the official release does (do_sample=True: temperature 1, transformers' default top_k 50);
  returns {dataset: AnnotationSummary}."""
  from teacherlm_jax import annotate, annotation_inputs
  teachers = tuple((name, str(curriculum_dir / f"stage3_{name}")) for name in ("fundamental", "cot",
                                                                                  "common_mistakes"))
  summaries = {}
  for dataset in ("creak", "ecqa"):
    sample = out / dataset / "input.jsonl"
    sample.parent.mkdir(parents=True, exist_ok=True)
    lines = (REPO / "tasks" / "data" / dataset / "train.jsonl").read_text().splitlines()[:per_dataset]
    sample.write_text("\n".join(lines) + "\n")
    config = annotate.AnnotationConfig(
        input=annotation_inputs.InputSpec(str(sample)), output_dir=str(out / dataset), teachers=teachers,
        max_input_length=384, max_new_tokens=64, temperature=1.0, top_k=50, batch_size=16, chunk_size=16)
    summaries[dataset] = annotate.run(config)
  return summaries


def run_students(out: pathlib.Path, annotated: dict, model_gin: str = "tiny.gin",
                 variants: list[str] | None = None) -> dict:
  """Tiny students on the annotated samples (gin/runs/students.gin with tiny steps and gin/models/`model_gin`);
  {variant: {task: acc}}."""
  import gin
  from teacherlm_jax import gin_utils, students
  gin.clear_config()
  bindings = {"MODEL_DIR": f"'{out}'", "ANNOTATED": repr({name: {"train": path} for name, path in annotated.items()}),
              "FINETUNE_DATASET": "'creak'", "EVAL_TASKS": "['teacherlm_eval_creak', 'teacherlm_eval_ecqa']",
              "MULTITASK_STEPS": 20, "FINETUNE_STEPS": 10, "BATCH_SIZE": 8, "LEARNING_RATE": 3e-3,
              "WARMUP_STEPS": 3, "TASK_FEATURE_LENGTHS": "{'inputs': 128, 'targets': 384}",
              "train.train.log_every": 5}
  if variants is not None:
    bindings["VARIANTS"] = repr(variants)
  gin_utils.parse_gin([str(REPO / "gin" / "runs" / "students.gin"), str(REPO / "gin" / "models" / model_gin)],
                      [f"{name} = {value}" for name, value in bindings.items()])
  try:
    return gin.get_configurable(students.run)()
  finally:
    gin.clear_config()


def learning_by_teaching(out: pathlib.Path, teacher: pathlib.Path, student: pathlib.Path) -> dict:
  """LbT on the first embedded CREAK validation questions (see teacherlm_jax/lbt.py): M1 (the teacher solves each
  question without its answer, K = 3 samples, the answer-only student takes exams), the selection report, and one
  round of DPO on the correctness+lbt pairs."""
  from teacherlm_jax import annotation_inputs, lbt
  problems = out / "problems.jsonl"
  out.mkdir(parents=True, exist_ok=True)
  problems.write_text("\n".join((REPO / "tasks/data/creak/validation.jsonl").read_text().splitlines()[:16]) + "\n")
  config = lbt.LbtConfig(input=annotation_inputs.InputSpec(str(problems)), output_dir=str(out),
                         teacher=str(teacher), students=(str(student),), num_candidates=3, exam_size=3,
                         max_new_tokens=48, batch_size=16, max_input_length=384, max_length=768)
  lbt.score(config)
  report = lbt.selection_report(config)
  pairs = lbt.preference_pairs(config, "correctness+lbt")
  dpo = None
  if pathlib.Path(pairs).read_text().strip():
    dpo = lbt.dpo_teacher(config, pairs, str(teacher), str(out / "dpo"),
                          {"train_steps": 3, "beta": 0.1, "batch_size": 8, "learning_rate": 1e-4,
                           "sequence_length": 512})
  return {"report": report, "dpo": dpo}


def run(hf_dir: pathlib.Path, out: pathlib.Path) -> dict:
  """Runs the Hugging Face part of the demo into `out` and returns its summary."""
  ckpt, export = out / "params_checkpoint", out / "hf_export"
  convert.import_hf(str(hf_dir), str(ckpt))
  config = checkpoints.load_config(str(ckpt))
  model, params = registry.build(config), checkpoints.load_params(str(ckpt))
  vocabulary = vocabularies.HfTokenizerVocabulary(str(ckpt / "tokenizer.json"))

  scores = sequence_log_likelihoods(model, params, [vocabularies.encode_prompt(vocabulary, s) for s in SENTENCES])
  prompt_ids = vocabularies.encode_prompt(vocabulary, PROMPT)
  continuation = greedy_continuation(model, params, prompt_ids, new_tokens=12)
  convert.export_hf(str(ckpt), str(export))
  reimported = convert.import_hf_params(str(export), config)
  round_trip = all(jax.tree.leaves(jax.tree.map(np.array_equal, reimported, jax.device_get(params))))
  summary = {
      "model": registry.config_to_dict(config),
      "params": common.count_params(params),
      "log_likelihoods": {s: float(v) for s, v in zip(SENTENCES, scores)},
      "prompt": PROMPT,
      "greedy_continuation": vocabulary.decode(continuation),
      "greedy_token_ids": continuation,
      "export_round_trip_bit_identical": round_trip,
      "outputs": {"params_checkpoint": str(ckpt), "hf_export": str(export)},
  }
  (out / "demo.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
  return summary


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m teacherlm_jax.demo", description=__doc__.split("\n")[0])
  parser.add_argument("--hf_dir", type=pathlib.Path, default=DEFAULT_HF_DIR,
                      help="a Hugging Face BLOOM directory (default: the embedded tiny random BLOOM)")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs/demo"))
  parser.add_argument("--skip_curriculum", action="store_true")
  args = parser.parse_args(argv)
  out = args.out.resolve()
  if out.exists():
    shutil.rmtree(out)  # the demo starts afresh each time
  summary = run(args.hf_dir, out)
  print(f"\n1. BLOOM with {summary['params']:,} parameters (random weights) imported from {args.hf_dir}")
  for sentence, score in summary["log_likelihoods"].items():
    print(f"  log p = {score:9.3f}  {sentence}")
  print(f"  greedy continuation of {PROMPT!r}: {summary['greedy_continuation']!r}")
  print(f"  exported to Hugging Face format and re-imported bit-identical: {summary['export_round_trip_bit_identical']}")
  outputs = dict(summary["outputs"])
  for family, hf_dir in OTHER_FAMILIES.items():
    other = run(hf_dir, out / "families" / hf_dir.name)
    print(f"  {family} with {other['params']:,} parameters from {hf_dir.name}: greedy "
          f"{other['greedy_continuation']!r}, round trip bit-identical: {other['export_round_trip_bit_identical']}")
    outputs[f"hf_export_{hf_dir.name}"] = other["outputs"]["hf_export"]
  if not args.skip_curriculum:
    shell.setup_logging()
    stages = run_curriculum(out / "curriculum")
    print("\n2. TeacherLM curriculum (tiny model, embedded samples): training loss per stage")
    for stage in stages:
      print(f"  {stage['stage']:24s} loss {stage['first_loss']:.3f} -> {stage['final_loss']:.3f}")
    outputs["curriculum"] = str(out / "curriculum")
    outputs.update({f"teacher_{name}": str(out / "curriculum" / f"stage3_{name}" / "final_params")
                    for name in ("fundamental", "cot", "common_mistakes")})
    outputs["tensorboard"] = f"tensorboard --logdir {out / 'curriculum'}"
    annotations = annotate_samples(out / "curriculum", out / "annotation")
    print("\n3. Annotation of embedded CREAK and ECQA samples by the three tiny teachers: " + ", ".join(
        f"{name} {s.annotated} records ({sum(s.new_tokens.values())} tokens)" for name, s in annotations.items()))
    for line in pathlib.Path(annotations["creak"].output).read_text().splitlines()[:2]:
      record = json.loads(line)
      print(f"  Q: {record['sentence']}")
      for field in ("fundamental", "cot", "error"):
        print(f"    {field:12s} {record[field][:70]!r}")
    results = run_students(out / "students", {name: s.output for name, s in annotations.items()})
    print("\n4. Students (tiny, a few steps): rank-classification accuracy after fine-tuning on CREAK")
    for variant, accuracies in results.items():
      print(f"  BLOOM {variant:16s} " + "  ".join(f"{task} {acc:.3f}" for task, acc in accuracies.items()))
    opt_results = run_students(out / "students_opt", {name: s.output for name, s in annotations.items()},
                               "tiny_opt.gin", OPT_STUDENT_VARIANTS)
    for variant, accuracies in opt_results.items():
      print(f"  OPT   {variant:16s} " + "  ".join(f"{task} {acc:.3f}" for task, acc in accuracies.items()))
    lbt_result = learning_by_teaching(out / "lbt", out / "curriculum" / "stage3_cot",
                                      out / "students" / "answer_only" / "finetune")
    accuracies, dpo = lbt_result["report"]["student_sets"]["all students"], lbt_result["dpo"]
    print("\n5. Learning by teaching (M1): answer accuracy of each selection method (the answer-only student's "
          "exams): " + ", ".join(f"{m} {accuracies[m]:.3f}" for m in ("greedy", "self_consistency", "lbt_max",
                                                                        "lbt_sum", "lbt_mean"))
          + f"; mean lbt_gain {accuracies['mean_lbt_gain']:+.3f}; "
          + (f"DPO reward margin {dpo['reward_margin']:.3f}" if dpo else "no preference pairs (tiny models)"))
    from teacherlm_jax import report
    report_path = report.write_report(str(out))
    print(f"\n6. Report: {report_path}")
    outputs.update({"annotated_creak": annotations["creak"].output, "annotated_ecqa": annotations["ecqa"].output,
                    "students": str(out / "students"), "students_opt": str(out / "students_opt"),
                    "lbt": str(out / "lbt"), "report": report_path})
  print("\nOutputs:")
  for name, path in outputs.items():
    print(f"  {name:22s} {path}")
  print(f"  {'summary':22s} {out / 'demo.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
