"""Zero-shot (or k-shot) rank-classification evaluation, as the paper's MMLU protocol (PROMPTS.md).

  python -m teacherlm_jax.evaluate --gin_file=gin/runs/eval.gin --gin.CHECKPOINT_PATH="'...'" \\
      --gin.EVAL_TASKS="['teacherlm_eval_mmlu','teacherlm_eval_creak']" [--gin.OUTPUT_DIR="'/tmp/eval'"]

Every example of an evaluation task (`tasks.evaluation`, `tasks.students`) is a context ending in "(" and candidate
continuations (the option letters). The prediction is the option with the highest log-likelihood
sum_t log p(option_t | context, option_<t), no length normalisation. Context and option are tokenized separately and
concatenated (as lm-evaluation-harness does). Each context is encoded once: a prefill pass over the batch of contexts
fills the KV cache and gives every option's first-token log-probability; options of more than one token are then
scored in one more call over the cache copied once per option. Contexts are batched by length
(`decoding.plan_batches`) and sharded over the mesh's data-parallel axes.

Shared prefixes (learning by teaching: one worked example followed by E exam questions): `score_shared_examples`
encodes each prefix once and scores its questions over the prefix's KV cache. A prefill pass over a batch of
left-padded prefixes [b, lp] fills a cache of lp slots; every row is repeated E times (row i -> rows i*E ... i*E+E-1)
and the cache grown by lq + t slots; the E questions of every prefix [b*E, lq], left-padded too, run over it in one
call whose last column gives the first option token's log-probability; several-token options are then scored as
above. A question's pads sit between its prefix and its first token, but they have segment 0 (never attended) and
do not count towards the positions (those continue after each row's cached valid tokens), so every family (ALiBi,
learned positions, RoPE) sees the real positions and a question scores the same as its whole prompt encoded from
scratch. Per exam prompt the model runs lp / E + lq tokens instead of lp + lq. A prefix too long for a question
keeps its last tokens (after the BOS); questions whose trimmed prefixes differ get their own copy of that prefix.

k-shot: the first k examples of `shot_split` (for MMLU of the same subject) are prepended as
`{context}{answer})` joined by spaces; MMLU's header line is kept only once, at the start.

Results: per-task accuracy; for tasks with subjects (MMLU) per subject, per category and overall, both the micro
average (over questions: `accuracy`) and the macro average over subjects (`subject_macro_accuracy`). Written as
`OUTPUT_DIR/eval_results.json`, `eval_results.md` and per-example `predictions_<task>.jsonl`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import sys
from typing import Any, Mapping, Optional, Sequence

import gin
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import seqio
from etils import epath
from jax.sharding import Mesh
from tqdm import tqdm

from teacherlm_jax import checkpoints, convert, decoding, partitioning, shell, vocabularies
from teacherlm_jax.models import common

log = shell.log


@dataclasses.dataclass(frozen=True)
class EvalExample:
  """A rank-classification example: the context, the candidate continuations and the index of the right one."""

  context: str
  options: tuple[str, ...]
  target: int
  example_id: str
  subject: str = ""
  category: str = ""


def task_examples(task_name: str, split: str) -> list[EvalExample]:
  """The examples of an evaluation task's split, in order."""
  import tasks  # noqa: F401  (registers our tasks)
  from tasks import registry
  task = registry.get_mixture_or_task(task_name)
  examples = []
  for features in task.source.get_dataset(split=split, shuffle=False).as_numpy_iterator():
    text = {key: value.decode("utf-8") if isinstance(value, bytes) else value for key, value in features.items()}
    options = tuple(text["options"].split())
    examples.append(EvalExample(text["inputs"], options, options.index(text["targets"]), text["example_id"],
                                text.get("subject", ""), text.get("category", "")))
  return examples


def default_split(task_name: str) -> str:
  """`test` when the task has one, else `validation`."""
  import tasks  # noqa: F401
  from tasks import registry
  splits = registry.get_mixture_or_task(task_name).splits
  return "test" if "test" in splits else "validation"


def with_shots(examples: Sequence[EvalExample], shots: Sequence[EvalExample], num_shots: int) -> list[EvalExample]:
  """Prepends `num_shots` solved examples (of the same subject, when there are subjects) to every context."""
  if not num_shots:
    return list(examples)
  by_subject = collections.defaultdict(list)
  for shot in shots:
    by_subject[shot.subject].append(shot)
  result = []
  for example in examples:
    chosen = by_subject[example.subject][:num_shots]
    if len(chosen) < num_shots:
      raise ValueError(f"{num_shots}-shot: only {len(chosen)} shot examples for subject {example.subject!r}")
    header, _, _ = example.context.partition("Q: ")
    solved = [f"{shot.context[len(header):]}{shot.options[shot.target]})." for shot in chosen]
    result.append(dataclasses.replace(example, context=header + " ".join(solved + [example.context[len(header):]])))
  return result


def _repeat_rows(cache, times: int) -> dict:
  """Every cache row repeated `times` times (row i -> rows i*times ... i*times + times - 1)."""
  def repeat(leaf, axes):
    return jnp.repeat(leaf, times, axis=axes.index("batch")) if "batch" in axes else leaf
  return jax.tree.map(repeat, cache, decoding.cache_logical_axes(cache))


def _option_scores(model: nn.Module, params, cache, last_logits: jax.Array, option_tokens: jax.Array,
                   option_mask: jax.Array) -> jax.Array:
  """Log-likelihoods [b, k] of k options per row, given the logits [b, v] of every row's last token and the cache
  after it (room for the options' tokens): the first option token from `last_logits`, the others from one more call
  over the cache repeated once per option."""
  batch, num_options, option_length = option_tokens.shape
  first = jax.nn.log_softmax(last_logits.astype(jnp.float32), axis=-1)  # [b, v]
  scores = jnp.take_along_axis(first, option_tokens[:, :, 0], axis=-1) * option_mask[:, :, 0]
  if option_length > 1:
    cache = _repeat_rows(cache, num_options)
    flat = option_tokens.reshape(batch * num_options, option_length)
    step_logits, _ = model.apply({"params": params, "cache": decoding.constrain_cache(cache)}, flat[:, :-1],
                                 decode=True, mutable=["cache"])
    log_probs = jax.nn.log_softmax(step_logits.astype(jnp.float32), axis=-1)
    rest = jnp.take_along_axis(log_probs, flat[:, 1:, None], axis=-1)[..., 0]
    rest = rest.reshape(batch, num_options, option_length - 1) * option_mask[:, :, 1:]
    scores = scores + rest.sum(axis=-1)
  return scores


def score_batch(model: nn.Module, params, context_tokens: jax.Array, context_mask: jax.Array,
                option_tokens: jax.Array, option_mask: jax.Array) -> jax.Array:
  """Log-likelihoods [b, k] of k options per context.

  Args:
    context_tokens, context_mask: [b, l] left-padded contexts.
    option_tokens, option_mask: [b, k, t] right-padded option continuations (mask 1 on real tokens).
  """
  batch, length = context_tokens.shape
  option_length = option_tokens.shape[2]
  cache = decoding.constrain_cache(common.init_cache(model, batch, length + option_length))
  logits, state = model.apply({"params": params, "cache": cache}, context_tokens, context_mask, decode=True,
                              last_only=True, mutable=["cache"])
  return _option_scores(model, params, state["cache"], logits[:, -1], option_tokens, option_mask)


def score_shared_batch(model: nn.Module, params, prefix_tokens: jax.Array, prefix_mask: jax.Array,
                       question_tokens: jax.Array, question_mask: jax.Array, option_tokens: jax.Array,
                       option_mask: jax.Array) -> jax.Array:
  """Log-likelihoods [b*E, k] of k options per question, E questions after each of b prefixes (see the module
  docstring): the same as `score_batch` on every prefix + question concatenated.

  Args:
    prefix_tokens, prefix_mask: [b, lp] left-padded prefixes.
    question_tokens, question_mask: [b*E, lq] left-padded questions, rows i*E ... i*E+E-1 after prefix i; every
      question has at least one token.
    option_tokens, option_mask: [b*E, k, t] right-padded option continuations (mask 1 on real tokens).
  """
  batch, prefix_length = prefix_tokens.shape
  rows, question_length = question_tokens.shape
  option_length = option_tokens.shape[2]
  if rows % batch:
    raise ValueError(f"{rows} question rows for {batch} prefixes: expected E questions per prefix (a multiple of "
                     f"{batch} rows); pad every exam to the same size")
  cache = decoding.constrain_cache(common.init_cache(model, batch, prefix_length))
  _, state = model.apply({"params": params, "cache": cache}, prefix_tokens, prefix_mask, decode=True,
                         last_only=True, hidden_only=True, mutable=["cache"])
  cache = decoding.grow_cache(_repeat_rows(state["cache"], rows // batch),
                              prefix_length + question_length + option_length)
  logits, state = model.apply({"params": params, "cache": cache}, question_tokens, question_mask, decode=True,
                              last_only=True, mutable=["cache"])
  return _option_scores(model, params, state["cache"], logits[:, -1], option_tokens, option_mask)


def jit_score(model: nn.Module, mesh: Optional[Mesh] = None,
              rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES):
  """`score_batch` under jit: (params, host context tokens/mask, option tokens/mask) -> numpy [b, k]."""
  rows, options = ("batch", "length"), ("batch", None, "length")
  return partitioning.jit_host_io(functools.partial(score_batch, model), functools.partial(common.init_params, model),
                                  [rows, rows, options, options], mesh, rules)


def jit_score_shared(model: nn.Module, mesh: Optional[Mesh] = None,
                     rules: partitioning.LogicalAxisRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES):
  """`score_shared_batch` under jit: (params, host prefix tokens/mask, question tokens/mask, option tokens/mask) ->
  numpy [b*E, k]; prefix and question rows sharded over the data-parallel axes."""
  rows, options = ("batch", "length"), ("batch", None, "length")
  return partitioning.jit_host_io(functools.partial(score_shared_batch, model),
                                  functools.partial(common.init_params, model),
                                  [rows, rows, rows, rows, options, options], mesh, rules)


def option_arrays(options: Sequence[Sequence[Sequence[int]]], num_options: int, length: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Per-row option token lists -> right-padded tokens and mask [rows, num_options, length]."""
  tokens = np.zeros((len(options), num_options, length), np.int32)
  mask = np.zeros_like(tokens)
  for row, row_options in enumerate(options):
    for k, ids in enumerate(row_options):
      tokens[row, k, :len(ids)], mask[row, k, :len(ids)] = ids, 1
  return tokens, mask


def score_examples(examples: Sequence[EvalExample], scorer, vocabulary: seqio.Vocabulary, batch_size: int,
                   max_length: int, desc: str = "score", row_multiple: int = 1) -> list[np.ndarray]:
  """Each example's option log-likelihoods (in the order of `examples`); `row_multiple` is the data-parallel mesh
  size (a partial batch is padded to a multiple of it)."""
  contexts = [vocabularies.encode_prompt(vocabulary, example.context, max_length) for example in examples]
  options = [[vocabulary.encode(option) for option in example.options] for example in examples]
  if any(not ids for row in options for ids in row):
    raise ValueError(f"{desc}: an option encodes to no tokens")
  num_options = max(len(row) for row in options)
  option_length = max(len(ids) for row in options for ids in row)
  results: list[Optional[np.ndarray]] = [None] * len(examples)
  progress = tqdm(total=len(examples), desc=desc, unit="ex", disable=jax.process_index() > 0)
  for positions, length in decoding.plan_batches([len(c) for c in contexts], batch_size, max_length):
    filler = decoding.batch_rows(len(positions), batch_size, row_multiple) - len(positions)
    rows = positions + [positions[0]] * filler  # their scores are dropped
    tokens, mask = decoding.left_pad([contexts[p] for p in rows], length)
    option_tokens, option_mask = option_arrays([options[p] for p in rows], num_options, option_length)
    scores = scorer(tokens, mask, option_tokens, option_mask)
    for row, position in enumerate(positions):
      results[position] = scores[row, :len(options[position])]
    progress.update(len(positions))
  progress.close()
  return results


def _prefix_units(prefixes: Sequence[Sequence[int]], questions: Sequence[Sequence[Sequence[int]]],
                  vocabulary: seqio.Vocabulary, max_length: int, desc: str
                  ) -> list[tuple[list[int], list[tuple[int, int]]]]:
  """[(prefix tokens, [(exam i, question j), ...])]: the questions of each prefix grouped by the prefix tokens they
  follow (the whole prefix, or its last tokens when prefix + question is longer than `max_length`)."""
  bos = 0 if vocabularies.bos_to_prepend(vocabulary) is None else 1
  units = []
  for i, (prefix, exam) in enumerate(zip(prefixes, questions)):
    by_length: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}
    for j, question in enumerate(exam):
      if not question:
        raise ValueError(f"{desc}: question {j} after prefix {i} encodes to no tokens; every exam context needs "
                         f"at least one (e.g. the answer's opening \"(\")")
      if len(question) + bos > max_length:
        raise ValueError(f"{desc}: question {j} after prefix {i} has {len(question)} tokens (+{bos} BOS), more than "
                         f"max_length {max_length}; raise max_length or shorten the question")
      room = max_length - len(question)
      kept = list(prefix) if len(prefix) <= room else vocabularies.keep_last(vocabulary, prefix, room)
      by_length.setdefault(len(kept), (kept, []))[1].append((i, j))
    units.extend(by_length.values())
  return units


def score_shared_examples(prefixes: Sequence[str], exams: Sequence[Sequence[EvalExample]], scorer,
                          vocabulary: seqio.Vocabulary, batch_size: int, max_length: int, desc: str = "exam",
                          row_multiple: int = 1) -> list[list[np.ndarray]]:
  """Option log-likelihoods of exam questions that follow shared prefixes, each prefix encoded once.

  `exams[i]` are the examples whose prompts are `prefixes[i] + example.context`; result `[i][j]` is what
  `score_examples` gives `exams[i][j]` with that whole prompt as its context (for the same token ids: the prefix
  encoded by `vocabularies.encode_prompt`, the context by `vocabulary.encode`). A prompt longer than `max_length`
  keeps the prefix's last tokens (the question stays whole). `scorer(prefix_tokens, prefix_mask, question_tokens,
  question_mask, option_tokens, option_mask)` is a bound `jit_score_shared`.

  Every batch holds prefixes of similar length (`decoding.plan_batches`), each with E question rows (E = the
  largest exam; smaller ones are padded with filler rows whose scores are dropped): about `batch_size` exam prompts
  per call, at least `row_multiple` (the data-parallel mesh size) prefixes.
  """
  if len(prefixes) != len(exams):
    raise ValueError(f"{desc}: {len(prefixes)} prefixes but {len(exams)} exams; expected one exam per prefix")
  prefix_ids = [vocabularies.encode_prompt(vocabulary, prefix) for prefix in prefixes]
  questions = [[vocabulary.encode(example.context) for example in exam] for exam in exams]
  options = [[[vocabulary.encode(option) for option in example.options] for example in exam] for exam in exams]
  if any(not ids for exam in options for row in exam for ids in row):
    raise ValueError(f"{desc}: an option encodes to no tokens")
  results: list[list[Optional[np.ndarray]]] = [[None] * len(exam) for exam in exams]
  units = _prefix_units(prefix_ids, questions, vocabulary, max_length, desc)
  if not units:
    return results
  group = max(len(members) for _, members in units)
  num_options = max(len(row) for exam in options for row in exam)
  option_length = max(len(ids) for exam in options for row in exam for ids in row)
  per_batch = max(row_multiple, batch_size // group // row_multiple * row_multiple)
  progress = tqdm(total=sum(len(exam) for exam in exams), desc=desc, unit="ex", disable=jax.process_index() > 0)
  for positions, prefix_length in decoding.plan_batches([len(tokens) for tokens, _ in units], per_batch,
                                                        max_length):
    filler = decoding.batch_rows(len(positions), per_batch, row_multiple) - len(positions)
    chosen = [units[p] for p in positions + [positions[0]] * filler]  # fillers' scores are dropped
    rows = [members[k % len(members)] for _, members in chosen for k in range(group)]
    prefix_tokens, prefix_mask = decoding.left_pad([tokens for tokens, _ in chosen], prefix_length)
    question_length = decoding.bucket_length(max(len(questions[i][j]) for i, j in rows), max_length)
    question_tokens, question_mask = decoding.left_pad([questions[i][j] for i, j in rows], question_length)
    option_tokens, option_mask = option_arrays([options[i][j] for i, j in rows], num_options, option_length)
    scores = scorer(prefix_tokens, prefix_mask, question_tokens, question_mask, option_tokens, option_mask)
    for slot, position in enumerate(positions):
      for k, (i, j) in enumerate(units[position][1]):
        results[i][j] = scores[slot * group + k, :len(options[i][j])]
    progress.update(sum(len(units[p][1]) for p in positions))
  progress.close()
  return results


def accuracy_report(examples: Sequence[EvalExample], scores: Sequence[np.ndarray]) -> dict[str, Any]:
  """Accuracy, and with subjects: per subject, per category, and the macro average over subjects."""
  correct = [int(np.argmax(s)) == e.target for e, s in zip(examples, scores)]
  report: dict[str, Any] = {"examples": len(examples), "accuracy": float(np.mean(correct)) if correct else 0.0}
  if any(e.subject for e in examples):
    for key in ("subject", "category"):
      groups = collections.defaultdict(list)
      for example, hit in zip(examples, correct):
        groups[getattr(example, key)].append(hit)
      report[f"per_{key}"] = {name: {"examples": len(hits), "accuracy": float(np.mean(hits))}
                              for name, hits in sorted(groups.items())}
    report["subject_macro_accuracy"] = float(np.mean([v["accuracy"] for v in report["per_subject"].values()]))
  return report


def markdown_table(results: Mapping[str, Mapping[str, Any]], checkpoint: str) -> str:
  """The results as Markdown: one row per task, then MMLU's categories."""
  lines = [f"Checkpoint: `{checkpoint}`", "", "| task | split | shots | examples | accuracy | subject macro |",
           "| --- | --- | --- | --- | --- | --- |"]
  for task, result in results.items():
    macro = f"{result['subject_macro_accuracy']:.4f}" if "subject_macro_accuracy" in result else ""
    lines.append(f"| {task} | {result['split']} | {result['num_shots']} | {result['examples']} | "
                 f"{result['accuracy']:.4f} | {macro} |")
  for task, result in results.items():
    if "per_category" in result:
      lines += ["", f"{task} per category (micro average over questions):", "", "| category | examples | accuracy |",
                "| --- | --- | --- |"]
      lines += [f"| {name} | {value['examples']} | {value['accuracy']:.4f} |"
                for name, value in result["per_category"].items()]
  return "\n".join(lines) + "\n"


def write_results(output_dir: str, checkpoint: str, results: Mapping[str, Any],
                  predictions: Mapping[str, list[dict]]) -> None:
  directory = epath.Path(output_dir)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "eval_results.json").write_text(json.dumps({"checkpoint": checkpoint, "tasks": results}, indent=2))
  (directory / "eval_results.md").write_text(markdown_table(results, checkpoint))
  for task, rows in predictions.items():
    (directory / f"predictions_{task}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def evaluate_task(task_name: str, scorer, vocabulary: seqio.Vocabulary, *, split: Optional[str], num_shots: int,
                  shot_split: Optional[str], batch_size: int, max_length: int, max_examples: Optional[int] = None,
                  row_multiple: int = 1) -> tuple[dict, list[dict]]:
  """(result, per-example predictions) of one task."""
  split = split or default_split(task_name)
  examples = task_examples(task_name, split)[:max_examples]
  if num_shots:
    shots = task_examples(task_name, shot_split or ("dev" if "mmlu" in task_name else "train"))
    examples = with_shots(examples, shots, num_shots)
  scores = score_examples(examples, scorer, vocabulary, batch_size, max_length, desc=task_name,
                          row_multiple=row_multiple)
  result = {"split": split, "num_shots": num_shots, **accuracy_report(examples, scores)}
  predictions = [{"example_id": e.example_id, "scores": [float(x) for x in s], "prediction": int(np.argmax(s)),
                  "target": e.target} for e, s in zip(examples, scores)]
  return result, predictions


def run(checkpoint_path: str, eval_tasks: Sequence[str], *, output_dir: Optional[str] = None,
        vocabulary: Optional[seqio.Vocabulary] = None, split: Optional[str] = None, num_shots: int = 0,
        shot_split: Optional[str] = None, batch_size: int = 32, max_length: int = 2048,
        max_examples: Optional[int] = None, mesh_shape: Sequence[int] = (1, -1, 1),
        dtype: str = "float32") -> dict[str, Any]:
  """Evaluates a checkpoint (params checkpoint, training run or Hugging Face directory) on `eval_tasks`."""
  mesh = partitioning.make_mesh(*mesh_shape)
  model, params = convert.load_model(checkpoint_path, mesh=mesh, dtype=dtype)
  vocabulary = vocabulary or checkpoints.load_vocabulary(checkpoints.resolve(checkpoint_path))
  if vocabulary is None:
    raise FileNotFoundError(f"{checkpoint_path} records no vocabulary; bind VOCABULARY")
  score = jit_score(model, mesh)
  results, predictions = {}, {}
  with partitioning.activation_rules(mesh):
    for task in eval_tasks:
      results[task], predictions[task] = evaluate_task(
          task, lambda *a: score(params, *a), vocabulary, split=split, num_shots=num_shots, shot_split=shot_split,
          batch_size=batch_size, max_length=max_length, max_examples=max_examples,
          row_multiple=partitioning.data_parallel_size(mesh))
      log.info("%s: accuracy %.4f on %d examples", task, results[task]["accuracy"], results[task]["examples"])
  if output_dir and jax.process_index() == 0:
    write_results(output_dir, checkpoint_path, results, predictions)
  return results


@gin.configurable
def evaluate(*, checkpoint_path: str, eval_tasks: Sequence[str], output_dir: Optional[str] = None,
             vocabulary: Optional[seqio.Vocabulary] = None, split: Optional[str] = None, num_shots: int = 0,
             shot_split: Optional[str] = None, batch_size: int = 32, max_length: int = 2048,
             max_examples: Optional[int] = None, mesh_shape: Sequence[int] = (1, -1, 1),
             dtype: str = "float32") -> tuple[str, dict[str, Any]]:
  """The gin entry point (gin/runs/eval.gin); see `run`."""
  results = run(checkpoint_path, eval_tasks, output_dir=output_dir, vocabulary=vocabulary, split=split,
                num_shots=num_shots, shot_split=shot_split, batch_size=batch_size, max_length=max_length,
                max_examples=max_examples, mesh_shape=mesh_shape, dtype=dtype)
  return checkpoint_path, results


def main(argv: Optional[Sequence[str]] = None) -> int:
  def report(result: tuple[str, dict[str, Any]]) -> None:
    if jax.process_index() == 0:
      print(markdown_table(result[1], result[0]))
  return shell.run_entry_point(evaluate, argv, report)


if __name__ == "__main__":
  from teacherlm_jax import evaluate as evaluate_module
  sys.exit(evaluate_module.main())
