"""Annotates a dataset with TeacherLM teachers: fundamentals, chain of thought and common mistakes per record.

  python -m teacherlm_jax.annotate --gin_file=gin/runs/annotate.gin \\
      --gin.INPUT="'data.jsonl'" --gin.OUTPUT_DIR="'/tmp/out'" \\
      [--gin.TEACHERS="{'cot': '/ckpt/stage3_cot', 'fundamental': '/hf/bloom-teacher'}"]

Each teacher (a params checkpoint, a training run's MODEL_DIR, or a Hugging Face BLOOM directory) continues the
prompt `Q: {question} A: The answer is ({letter}). {trigger}` of every record (`tasks.rendering`, exactly as the
official release); the continuation goes to the release's field: `fundamental`, `cot`, `error` (common mistakes).
`all` is the prompt of the first teacher plus its continuation, then ` {trigger}{continuation}` for each further
teacher (with one teacher: the release's prompt + generation). `provenance` names the input line, the teacher
checkpoints, the decoding settings, and per teacher the generated tokens, why generation stopped (`eos`,
`stop_string`, `length`) and how many prompt tokens were cut.

Work goes teacher by teacher (one model in memory at a time) and chunk by chunk (`chunk_size` input records): the
prompts stream into the continuous-batching engine (`teacherlm_jax.engine`, `engine='slots'`, the default): its
`batch_size` slots decode together under jit on the mesh, and a slot whose row stops is refilled with the next
prompt (of this chunk or the next) before the next `steps_per_call` steps, so no slot waits for the slowest row.
A chunk is committed to a part file (`annotation_store`) as soon as its last row has finished. `engine='static'`
decodes each chunk in static batches sorted by length (`decoding.plan_batches`), every batch until its slowest
row stops. A killed run restarts at the uncommitted chunks; when every chunk is committed the merged
`annotated.jsonl` (input order, every valid record exactly once) and `rejects.jsonl` are written, with
`summary.json`. `num_samples=K` draws K continuations per record from one prefill (sample k's stream:
`engine`'s docstring) and writes K records per input record, `provenance.sample` = k. With several processes (`jax.distributed`), every process reads the whole input and
runs the same batches (each feeds its slice of the batch to the mesh), and writes the records with
index % num_processes == its process index; OUTPUT_DIR must be on a file system they share.

Prompts longer than `max_input_length` tokens: `too_long='truncate_left'` (default) keeps their last tokens (the
trigger stays) and records the cut in `provenance`; `too_long='reject'` writes them to rejects.jsonl. Records that
cannot be read (invalid JSON or UTF-8, missing or malformed fields, output fields already present) always go to
rejects.jsonl with their file, line and reason.
"""

from __future__ import annotations

import dataclasses
import json
import string
import sys
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import gin
import jax
import numpy as np
import seqio
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from tasks import formats, rendering
from teacherlm_jax import (annotation_inputs, annotation_store, checkpoints, convert, decoding, engine, partitioning,
                           shell, vocabularies)

TOO_LONG_POLICIES = ("truncate_left", "reject")
ENGINES = ("slots", "static")
log = shell.log


@dataclasses.dataclass(frozen=True)
class AnnotationConfig:
  """An annotation run.

  Attributes:
    input: what to read and how records become samples.
    output_dir: where the run's files go (local or gs://).
    teachers: (teacher name, checkpoint) pairs in run order; names are keys of `tasks.rendering.TEACHERS`.
    max_input_length: the longest prompt in tokens; `too_long` says what happens to longer ones.
    max_new_tokens, temperature, top_k, top_p, stop_strings, seed: decoding (temperature 0 = greedy). A record's
      sampling stream is keyed by its input index, so outputs do not depend on batching or the process count.
    batch_size: decode slots (engine 'slots') or rows per batch ('static'), a multiple of the data-parallel mesh
      size; chunk_size: records per commit.
    num_samples: continuations per record (K > 1: one prefill, K slots; engine 'slots' only).
    engine: 'slots' (continuous batching) or 'static' (batches sorted by length); steps_per_call: token steps per
      engine call; tiers: the engine's slot tiers ((slots, nominal columns), ...; empty = one tier; see
      `engine.long_tail_tiers` for outputs that mostly stop early).
    first_phase_tokens: `decoding.DecodingConfig.first_phase_tokens` (static engine: new tokens of the first
      decoding phase, the KV cache growing by half in each later one; 0 = one phase). Engine, steps per call,
      tiers and phases change speed and compile time only, not the output.
    mesh_shape: (data, fsdp, tensor), -1 = the rest; dtype: activation dtype of the teachers.
    prompt_format: '' = the release's teacher prompt (`tasks.rendering.teacher_prompt`, the answer given); else a
      format string over {question}, {answer} and {trigger} (the release's space rule applied), e.g. LbT's
      solver prompt `Q: {question} A: Let's think step by step.`, which withholds the answer.
  """

  input: annotation_inputs.InputSpec
  output_dir: str
  teachers: tuple[tuple[str, str], ...]
  max_input_length: int = 512
  too_long: str = "truncate_left"
  max_new_tokens: int = 256
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop_strings: tuple[str, ...] = ()
  seed: int = 0
  batch_size: int = 32
  chunk_size: int = 256
  first_phase_tokens: int = 64
  mesh_shape: tuple[int, int, int] = (1, -1, 1)
  dtype: str = "float32"
  num_samples: int = 1
  engine: str = "slots"
  steps_per_call: int = 16
  tiers: tuple[tuple[int, int], ...] = ()
  prompt_format: str = ""

  def __post_init__(self):
    if self.engine not in ENGINES:
      raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
    if self.num_samples < 1 or (self.num_samples > 1 and self.engine != "slots"):
      raise ValueError(f"num_samples {self.num_samples}: must be >= 1, and > 1 needs engine='slots'")
    if self.steps_per_call < 1:
      raise ValueError(f"steps_per_call must be positive, got {self.steps_per_call}")
    unknown = [name for name, _ in self.teachers if name not in rendering.TEACHERS]
    if unknown or not self.teachers:
      raise ValueError(f"teachers must name some of {list(rendering.TEACHERS)}, got {[n for n, _ in self.teachers]}")
    if len({name for name, _ in self.teachers}) != len(self.teachers):
      raise ValueError(f"a teacher is named twice in {self.teachers}")
    if self.too_long not in TOO_LONG_POLICIES:
      raise ValueError(f"too_long must be one of {TOO_LONG_POLICIES}, got {self.too_long!r}")
    if self.max_input_length < 1 or self.batch_size < 1 or self.chunk_size < 1:
      raise ValueError("max_input_length, batch_size and chunk_size must be positive")
    if self.prompt_format:
      _check_prompt_format(self.prompt_format)

  def settings(self) -> dict[str, Any]:
    """What decides the output (run.json): everything except batch size, decoding phases and mesh, which do not
    change it."""
    settings = dataclasses.asdict(self)
    for name in ("batch_size", "first_phase_tokens", "mesh_shape", "output_dir", "engine", "steps_per_call",
                 "tiers"):
      settings.pop(name)
    if self.num_samples == 1:
      settings.pop("num_samples")  # as runs before num_samples existed
    if not self.prompt_format:
      settings.pop("prompt_format")  # likewise
    settings["teachers"] = [[name, _absolute(path)] for name, path in self.teachers]
    return settings

  def decoding_settings(self) -> dict[str, Any]:
    return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
            "top_p": self.top_p, "stop_strings": list(self.stop_strings), "seed": self.seed,
            "max_input_length": self.max_input_length, "too_long": self.too_long, "dtype": self.dtype}


@dataclasses.dataclass
class AnnotationSummary:
  """What a run produced (also written to OUTPUT_DIR/summary.json)."""

  output_dir: str
  records: int
  annotated: int
  rejected: int
  reject_kinds: dict[str, int]
  truncated_prompts: int
  new_tokens: dict[str, int]
  annotation_seconds: float
  wall_seconds: float
  output: str
  rejects: str


def _check_prompt_format(prompt_format: str) -> None:
  fields = {name for _, name, _, _ in string.Formatter().parse(prompt_format) if name is not None}
  if "question" not in fields or fields - {"question", "answer", "trigger"}:
    raise ValueError(f"prompt_format {prompt_format!r} has the fields {sorted(fields)}; it needs {{question}} and "
                     "may use {answer} and {trigger}, e.g. \"Q: {question} A: Let's think step by step.\"")


def _absolute(path: str) -> str:
  return str(checkpoints.absolute_path(epath.Path(path)))


def teacher_vocabulary(config: AnnotationConfig, vocabulary: Optional[seqio.Vocabulary]) -> seqio.Vocabulary:
  """The given vocabulary, else the one recorded with the first teacher; all teachers must record the same."""
  recorded = [checkpoints.load_vocabulary(checkpoints.resolve(path)) for _, path in config.teachers]
  if vocabulary is not None:
    return vocabulary
  if recorded[0] is None:
    raise FileNotFoundError(f"teacher {config.teachers[0][1]} records no vocabulary (no vocabulary.json or "
                            "tokenizer.json); bind VOCABULARY, e.g. include gin/models/tiny.gin")
  for (name, path), other in zip(config.teachers, recorded):
    if other != recorded[0]:
      raise ValueError(f"teacher {name} ({path}) uses another vocabulary ({other}) than {config.teachers[0][0]} "
                       f"({recorded[0]}); annotate with them in separate runs")
  return recorded[0]


def decoding_config(config: AnnotationConfig, vocabulary: seqio.Vocabulary) -> decoding.DecodingConfig:
  return decoding.DecodingConfig(
      max_new_tokens=config.max_new_tokens, eos_id=vocabulary.eos_id, temperature=config.temperature,
      top_k=config.top_k, top_p=config.top_p, pad_id=vocabulary.pad_id,
      stop_sequences=tuple(tuple(vocabulary.encode(stop)) for stop in config.stop_strings),
      first_phase_tokens=config.first_phase_tokens)


def teacher_prompt(config: AnnotationConfig, sample: annotation_inputs.Sample, teacher: str) -> str:
  """The prompt the teacher continues: the release's (`Sample.prompt`) or `config.prompt_format` filled in."""
  if not config.prompt_format:
    return sample.prompt(teacher)
  return rendering.remove_duplicated_block(config.prompt_format.format(question=sample.question, answer=sample.answer,
                                                                trigger=rendering.TEACHERS[teacher][0]))


def prepare_chunk(items: Sequence[annotation_inputs.Item], teacher: str, config: AnnotationConfig,
                  vocabulary: seqio.Vocabulary) -> tuple[list[dict], list[tuple[int, list[int], int]]]:
  """(reject entries, rows (index, prompt ids, prompt tokens cut)) of one chunk for one teacher."""
  rejects, rows = [], []
  for index, location, record in items:
    try:
      if isinstance(record, formats.BadRecord):
        raise record
      prompt = teacher_prompt(config, annotation_inputs.sample(config.input, location, record), teacher)
      ids = vocabularies.encode_prompt(vocabulary, prompt)
      cut = max(len(ids) - config.max_input_length, 0)
      if cut and config.too_long == "reject":
        raise formats.BadRecord(location, None, f"the {teacher} prompt has {len(ids)} tokens, more than "
                                                f"max_input_length {config.max_input_length} (too_long='reject')")
      rows.append((index, vocabularies.keep_last(vocabulary, ids, config.max_input_length), cut))
    except formats.BadRecord as error:
      rejects.append({"index": index, "rejected": error.as_json()})
  return rejects, rows


def decode_rows(rows: Sequence[tuple[int, list[int], int]], generate_fn, config: AnnotationConfig,
                row_multiple: int = 1) -> dict[int, tuple[np.ndarray, int]]:
  """{index: (generated tokens [max_new_tokens], number generated)}, batched by prompt length; `row_multiple` is the
  data-parallel mesh size (a partial batch is padded to a multiple of it)."""
  results = {}
  plan = decoding.plan_batches([len(ids) for _, ids, _ in rows], config.batch_size, config.max_input_length)
  for positions, length in plan:
    batch = [rows[p] for p in positions]
    filler = decoding.batch_rows(len(batch), config.batch_size, row_multiple) - len(batch)
    batch += [batch[0]] * filler  # their outputs are dropped
    tokens, mask = decoding.left_pad([ids for _, ids, _ in batch], length)
    seeds = np.asarray([index for index, _, _ in batch], np.int32)
    generated, lengths = generate_fn(tokens, mask, seeds)
    for row, position in enumerate(positions):
      results[rows[position][0]] = (generated[row], int(lengths[row]))
  return results


def finished_entry(index: int, generated: np.ndarray, length: int, cut: int, vocabulary: seqio.Vocabulary,
                   config: AnnotationConfig, stop: decoding.DecodingConfig) -> dict[str, Any]:
  """A committed annotation: the continuation text (cut at the first stop string) and how it ended (K > 1 samples:
  `sample_entries`)."""
  ids = [int(t) for t in generated[:length]]
  finish = "length"
  if ids and ids[-1] == stop.eos_id:
    ids, finish = ids[:-1], "eos"
  elif length < config.max_new_tokens:
    finish = "stop_string"
  text, found = decoding.cut_at_stop_strings(vocabulary.decode(ids), config.stop_strings)
  return {"index": index, "text": text, "new_tokens": length, "finish": "stop_string" if found else finish,
          "truncated_prompt_tokens": cut}


def sample_entries(index: int, samples: Sequence[np.ndarray], cut: int, vocabulary: seqio.Vocabulary,
                   config: AnnotationConfig, stop: decoding.DecodingConfig) -> dict[str, Any]:
  """The committed entry of one record: `finished_entry` of its one sample, or {"index", "samples": [...]}."""
  entries = [finished_entry(index, ids, len(ids), cut, vocabulary, config, stop) for ids in samples]
  if config.num_samples == 1:
    return entries[0]
  return {"index": index, "samples": [{k: v for k, v in e.items() if k != "index"} for e in entries]}


class _Committer:
  """Commits chunks of one teacher (part file, manifest, progress) as their last rows finish."""

  def __init__(self, teacher: str, config: AnnotationConfig, vocabulary: seqio.Vocabulary,
               stop: decoding.DecodingConfig, progress: tqdm):
    self.teacher, self.config, self.vocabulary, self.stop, self.progress = teacher, config, vocabulary, stop, progress
    self.process, self.processes = jax.process_index(), jax.process_count()
    self.manifest = annotation_store.Manifest(config.output_dir, self.process, self.processes)
    self.last, self.tokens, self.seconds = time.perf_counter(), 0, 0.0

  def commit(self, number: int, items: Sequence, rejects: list[dict], rows: Sequence[tuple[int, list[int], int]],
             outputs: Mapping[int, Sequence[np.ndarray]]) -> None:
    entries = rejects + [sample_entries(index, outputs[index], cut, self.vocabulary, self.config, self.stop)
                         for index, _, cut in rows]
    annotation_store.write_part(self.config.output_dir, self.teacher, number, self.process, self.processes, entries)
    now = time.perf_counter()
    new_tokens = sum(len(ids) for samples in outputs.values() for ids in samples)
    self.manifest.add(self.teacher, number, len(items), len(rejects), new_tokens, now - self.last)
    self.tokens, self.seconds, self.last = self.tokens + new_tokens, self.seconds + now - self.last, now
    self.progress.update(len(items))
    self.progress.set_postfix(tokens_per_s=f"{self.tokens / max(self.seconds, 1e-9):.1f}", rejected=len(rejects))


def pending_chunks(teacher: str, config: AnnotationConfig, vocabulary: seqio.Vocabulary, committed: Mapping,
                   progress: tqdm) -> Iterator[tuple[int, list, list[dict], list]]:
  """(chunk number, items, rejects, rows) of every chunk not committed yet for the teacher."""
  for number, items in annotation_inputs.chunks(annotation_inputs.iter_items(config.input), config.chunk_size):
    if number in committed:
      progress.update(len(items))
      continue
    rejects, rows = prepare_chunk(items, teacher, config, vocabulary)
    yield number, items, rejects, rows


def decode_static(chunks: Iterator, committer: _Committer, params, generate, config: AnnotationConfig,
                  row_multiple: int) -> None:
  """engine='static': each chunk in batches sorted by length, committed when decoded."""
  for number, items, rejects, rows in chunks:
    outputs = decode_rows(rows, lambda *a: generate(params, *a), config, row_multiple) if rows else {}
    committer.commit(number, items, rejects, rows,
                     {index: [generated[:length]] for index, (generated, length) in outputs.items()})


def decode_slots(chunks: Iterator, committer: _Committer, slots: engine.Engine, config: AnnotationConfig) -> None:
  """engine='slots': every chunk's prompts stream through the engine; a chunk commits when its last row is done."""
  open_chunks: dict[int, tuple] = {}

  def requests() -> Iterator[engine.Request]:
    for number, items, rejects, rows in chunks:
      outputs: dict[int, list] = {index: [None] * config.num_samples for index, _, _ in rows}
      open_chunks[number] = (items, rejects, rows, outputs, [len(rows) * config.num_samples])
      if not rows:
        committer.commit(number, items, rejects, rows, outputs)
        del open_chunks[number]
      for index, ids, _ in rows:
        yield engine.Request((number, index), ids, index, config.num_samples)

  for finished in slots.run(requests()):
    number, index = finished.key
    items, rejects, rows, outputs, left = open_chunks[number]
    outputs[index][finished.sample] = finished.ids
    left[0] -= 1
    if not left[0]:
      committer.commit(number, items, rejects, rows, outputs)
      del open_chunks[number]


def annotate_teacher(teacher: str, path: str, config: AnnotationConfig, vocabulary: seqio.Vocabulary,
                     mesh: jax.sharding.Mesh, total: Optional[int]) -> None:
  """Annotates every uncommitted chunk of the input with one teacher."""
  committed = annotation_store.committed_chunks(config.output_dir, teacher)
  multihost_utils.sync_global_devices(f"annotate_{teacher}_scanned")  # nobody writes before everyone has looked
  # Per-layer params: what decoding runs (no second, sliced copy of a scanned checkpoint's layers per call).
  model, params = convert.load_model(path, mesh=mesh, dtype=config.dtype, scan_layers=False)
  stop = decoding_config(config, vocabulary)
  log.info("teacher %s from %s: %d chunks already committed", teacher, path, len(committed))
  progress = tqdm(total=total, desc=f"annotate {teacher}", unit="rec", disable=jax.process_index() > 0,
                  dynamic_ncols=True)
  committer = _Committer(teacher, config, vocabulary, stop, progress)
  chunks = pending_chunks(teacher, config, vocabulary, committed, progress)
  with partitioning.activation_rules(mesh):
    if config.engine == "static":
      generate = decoding.jit_generate(model, stop, config.seed, mesh=mesh)
      decode_static(chunks, committer, params, generate, config, partitioning.data_parallel_size(mesh))
    else:
      slots = engine.Engine(model, params, stop, slots=config.batch_size, max_prompt_length=config.max_input_length,
                            tiers=config.tiers or None, steps_per_call=config.steps_per_call, seed=config.seed,
                            mesh=mesh)
      decode_slots(chunks, committer, slots, config)
      log.info("teacher %s: engine occupancy %.1f%% (%d steps of %d slots), %d prefills, %d moves", teacher,
               100 * slots.stats.occupancy, slots.stats.steps, slots.slots, slots.stats.prefills, slots.stats.moves)
  progress.close()


def merge(config: AnnotationConfig, started: float) -> AnnotationSummary:
  """Writes annotated.jsonl, rejects.jsonl and summary.json from the committed chunks."""
  stats = {"truncated": 0, "new_tokens": {name: 0 for name, _ in config.teachers}}

  committed = {name: annotation_store.committed_chunks(config.output_dir, name) for name, _ in config.teachers}

  def chunk_entries():
    for number, items in annotation_inputs.chunks(annotation_inputs.iter_items(config.input), config.chunk_size):
      yield items, {name: _committed_entries(config, name, number, committed[name]) for name, _ in config.teachers}

  def merge_record(item, entries):
    records = []
    for k in range(config.num_samples):
      sample = {name: entry if config.num_samples == 1 else {"index": entry["index"], **entry["samples"][k]}
                for name, entry in entries.items()}
      records.append(merged_record(item, sample, config))
      if config.num_samples > 1:
        records[-1]["provenance"]["sample"] = k
      stats["truncated"] += any(e["truncated_prompt_tokens"] for e in sample.values())
      for name, entry in sample.items():
        stats["new_tokens"][name] += entry["new_tokens"]
    return records

  counts = annotation_store.write_merged(config.output_dir, annotation_store.merged_rows(chunk_entries(),
                                                                                         merge_record))
  manifest = annotation_store.Manifest(config.output_dir, jax.process_index(), jax.process_count())
  directory = epath.Path(config.output_dir)
  summary = AnnotationSummary(
      output_dir=config.output_dir, records=counts["annotated"] + counts["rejected"], annotated=counts["annotated"],
      rejected=counts["rejected"], reject_kinds={k[len("reject: "):]: v for k, v in counts.items()
                                                 if k.startswith("reject: ")},
      truncated_prompts=stats["truncated"], new_tokens=stats["new_tokens"],
      annotation_seconds=round(manifest.seconds(), 3), wall_seconds=round(time.perf_counter() - started, 3),
      output=str(directory / annotation_store.OUTPUT_FILE), rejects=str(directory / annotation_store.REJECTS_FILE))
  annotation_store.write_atomically(directory / annotation_store.SUMMARY_FILE,
                                    json.dumps(dataclasses.asdict(summary), indent=2))
  return summary


def _committed_entries(config: AnnotationConfig, teacher: str, number: int, committed: dict[int, int]
                       ) -> dict[int, dict]:
  processes = committed.get(number)
  if processes is None:
    raise RuntimeError(f"chunk {number} of teacher {teacher} is not committed in {config.output_dir}")
  return annotation_store.read_chunk(config.output_dir, teacher, number, processes)


def merged_record(item: annotation_inputs.Item, entries: Mapping[str, dict], config: AnnotationConfig) -> dict:
  """The input record with the teachers' fields, `all` and `provenance`."""
  index, location, record = item
  sample = annotation_inputs.sample(config.input, location, record)
  merged, everything, teachers = dict(record), None, {}
  for name, path in config.teachers:
    entry = entries[name]
    trigger, field, _ = rendering.TEACHERS[name]
    merged[field] = entry["text"].strip()
    if everything is None:
      everything = teacher_prompt(config, sample, name) + entry["text"]
    else:
      everything = f"{everything.rstrip()} {trigger}{entry['text']}"
    teachers[name] = {"checkpoint": _absolute(path), "new_tokens": entry["new_tokens"], "finish": entry["finish"],
                      "truncated_prompt_tokens": entry["truncated_prompt_tokens"]}
  merged["all"] = everything
  merged["provenance"] = {"source": str(location), "index": index, "teachers": teachers,
                          "decoding": config.decoding_settings()}
  return merged


def run(config: AnnotationConfig, vocabulary: Optional[seqio.Vocabulary] = None) -> AnnotationSummary:
  """Annotates `config.input` with every teacher, resuming committed work, and merges the output."""
  started = time.perf_counter()
  vocabulary = teacher_vocabulary(config, vocabulary)
  settings = {**config.settings(), "vocabulary": str(vocabulary)}
  resumed = annotation_store.check_run_settings(config.output_dir, settings, write=jax.process_index() == 0)
  multihost_utils.sync_global_devices("annotate_settings")
  annotation_store.check_run_settings(config.output_dir, settings, write=False)
  log.info("%s %s", "resuming the annotation run in" if resumed else "annotating into", config.output_dir)
  mesh = partitioning.make_mesh(*config.mesh_shape)
  rows_axes = partitioning.data_parallel_size(mesh)
  if config.batch_size % rows_axes:
    raise ValueError(f"batch_size {config.batch_size} is not a multiple of the data-parallel mesh size "
                     f"{rows_axes} (data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']})")
  total = annotation_inputs.count_items(config.input)
  for name, path in config.teachers:
    annotate_teacher(name, path, config, vocabulary, mesh, total)
  multihost_utils.sync_global_devices("annotate_committed")
  if jax.process_index() == 0:
    summary = merge(config, started)
  multihost_utils.sync_global_devices("annotate_merged")
  if jax.process_index() != 0:
    summary = AnnotationSummary(**json.loads((epath.Path(config.output_dir) /
                                              annotation_store.SUMMARY_FILE).read_text()))
  return summary


@gin.configurable
def annotate(*, input: str, output_dir: str, teachers: Optional[Mapping[str, str]] = None,
             curriculum_dir: Optional[str] = None, teacher_names: Sequence[str] = tuple(rendering.TEACHERS),
             vocabulary: Optional[seqio.Vocabulary] = None, record_format: str = "auto",
             question_field: str = "question", answer_field: str = "answer", options_field: Optional[str] = None,
             tfds_data_dir: Optional[str] = None, max_input_length: int = 512, too_long: str = "truncate_left",
             max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_strings: Sequence[str] = (), seed: int = 0, batch_size: int = 32, chunk_size: int = 256,
             first_phase_tokens: int = 64, mesh_shape: Sequence[int] = (1, -1, 1),
             dtype: str = "float32", num_samples: int = 1, engine_name: str = "slots", steps_per_call: int = 16,
             tiers: Sequence[Sequence[int]] = (), prompt_format: str = "") -> AnnotationSummary:
  """The gin entry point (gin/runs/annotate.gin). `teachers` maps teacher names to checkpoints; without it the
  stage-3 teachers `teacher_names` of a curriculum run in `curriculum_dir` are used. See AnnotationConfig."""
  if teachers is None:
    if curriculum_dir is None:
      raise ValueError("set TEACHERS (teacher name -> checkpoint) or CURRICULUM_DIR (a curriculum run)")
    teachers = {name: str(epath.Path(curriculum_dir) / f"stage3_{name}") for name in teacher_names}
  spec = annotation_inputs.InputSpec(input, record_format, question_field, answer_field, options_field,
                                     tfds_data_dir)
  config = AnnotationConfig(
      input=spec, output_dir=output_dir, teachers=tuple(teachers.items()), max_input_length=max_input_length,
      too_long=too_long, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
      stop_strings=tuple(stop_strings), seed=seed, batch_size=batch_size, chunk_size=chunk_size,
      first_phase_tokens=first_phase_tokens, mesh_shape=tuple(mesh_shape), dtype=dtype, num_samples=num_samples,
      engine=engine_name, steps_per_call=steps_per_call, tiers=tuple(tuple(t) for t in tiers),
      prompt_format=prompt_format)
  return run(config, vocabulary)


def report(summary: AnnotationSummary) -> None:
  """The end-of-run summary on the console."""
  if jax.process_index() > 0:
    return
  lines = [f"annotated {summary.annotated} of {summary.records} records "
           f"({summary.rejected} rejected, {summary.truncated_prompts} prompts truncated)",
           f"generated tokens: {summary.new_tokens}",
           f"annotation time {summary.annotation_seconds:.1f} s (all runs), this run {summary.wall_seconds:.1f} s"]
  lines += [f"  rejected {count}: {kind}" for kind, count in sorted(summary.reject_kinds.items())]
  lines += [f"output:  {summary.output}", f"rejects: {summary.rejects}"]
  print("\n".join(lines))


def main(argv: Optional[Sequence[str]] = None) -> int:
  return shell.run_entry_point(annotate, argv, report)


if __name__ == "__main__":
  # Run the imported module (the one gin files register), not this __main__ copy of it.
  from teacherlm_jax import annotate as annotate_module
  sys.exit(annotate_module.main())
