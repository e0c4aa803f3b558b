"""The output directory of an annotation run: per-chunk commits, per-process manifests, and the merged output.

  OUTPUT_DIR/run.json                 the settings that decide the output (input, teachers, prompts, decoding,
                                      chunk size); a restart with other settings is refused, naming the difference
  OUTPUT_DIR/work/<teacher>/chunk-000012.p00001-of-00002.jsonl
                                      process 1's part of chunk 12 (input items 12*chunk_size ...): one line per
                                      record it owns (index % num_processes == process), either
                                      {"index", "text", "new_tokens", "finish", "truncated_prompt_tokens"}, with
                                      K > 1 samples {"index", "samples": [{"text", ...} x K]}, or
                                      {"index", "rejected": {file, line|record, field, reason}}
  OUTPUT_DIR/manifests/process-00001-of-00002.json
                                      what that process committed: (teacher, chunk, records, rejected, tokens, seconds)
  OUTPUT_DIR/annotated.jsonl          the merged output: every valid input record once (K samples: K times,
                                      provenance.sample = 0 .. K-1), in input order, with the teachers' fields,
                                      `all` and `provenance`
  OUTPUT_DIR/rejects.jsonl            every rejected input record once, in input order: index, file, line, field,
                                      reason
  OUTPUT_DIR/summary.json             counts, tokens and times

A part file is written to a temporary name and renamed, so it exists only when complete: a chunk is committed for a
teacher when all parts of one process count are there. A killed run restarts at the first uncommitted chunk (the
process count may change between runs). The merged files are written once, after every chunk is committed, also
through a temporary name.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
from typing import Any, Iterable, Iterator, Mapping

from etils import epath

RUN_FILE = "run.json"
OUTPUT_FILE = "annotated.jsonl"
REJECTS_FILE = "rejects.jsonl"
SUMMARY_FILE = "summary.json"
_PART = re.compile(r"chunk-(\d{6})\.p(\d{5})-of-(\d{5})\.jsonl")


def write_atomically(path: epath.Path, text: str) -> None:
  """Writes `text` to a temporary file next to `path`, then renames it to `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
  temporary.write_text(text)
  temporary.replace(path)


def write_jsonl_atomically(path: epath.Path, rows: Iterable[Mapping[str, Any]]) -> int:
  """Writes JSON lines through a temporary file (streamed, for large outputs); returns the number of lines."""
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
  count = 0
  with temporary.open("w") as handle:
    for row in rows:
      handle.write(json.dumps(row, ensure_ascii=False) + "\n")
      count += 1
  temporary.replace(path)
  return count


def check_run_settings(output_dir: str, settings: Mapping[str, Any], *, write: bool) -> bool:
  """Compares `settings` with those of an earlier run in `output_dir`; writes them when there are none and `write`.

  Returns whether an earlier run exists. Raises ValueError naming the settings that differ.
  """
  path = epath.Path(output_dir) / RUN_FILE
  settings = json.loads(json.dumps(settings))  # tuples -> lists, as stored
  if path.exists():
    stored = json.loads(path.read_text())
    differ = sorted(key for key in set(stored) | set(settings) if stored.get(key) != settings.get(key))
    if differ:
      detail = "; ".join(f"{key}: {stored.get(key)!r} before, {settings.get(key)!r} now" for key in differ)
      raise ValueError(f"{output_dir} holds an annotation run with other settings ({detail}); use another "
                       "OUTPUT_DIR, or the same settings to resume")
    return True
  if write:
    write_atomically(path, json.dumps(settings, indent=2, sort_keys=True))
  return False


def part_path(output_dir: str, teacher: str, chunk: int, process: int, num_processes: int) -> epath.Path:
  return epath.Path(output_dir) / "work" / teacher / f"chunk-{chunk:06d}.p{process:05d}-of-{num_processes:05d}.jsonl"


def committed_chunks(output_dir: str, teacher: str) -> dict[int, int]:
  """{chunk: process count of a complete set of its parts} for the teacher's committed chunks (the smallest count
  when several runs completed it)."""
  directory = epath.Path(output_dir) / "work" / teacher
  if not directory.exists():
    return {}
  parts = collections.defaultdict(set)
  for path in directory.iterdir():
    match = _PART.fullmatch(path.name)
    if match:
      chunk, process, count = (int(group) for group in match.groups())
      parts[(chunk, count)].add(process)
  committed: dict[int, int] = {}
  for (chunk, count), processes in sorted(parts.items()):
    if len(processes) == count and chunk not in committed:
      committed[chunk] = count
  return committed


def write_part(output_dir: str, teacher: str, chunk: int, process: int, num_processes: int,
               entries: Iterable[Mapping[str, Any]]) -> None:
  """Commits this process's entries of a chunk (the records with index % num_processes == process)."""
  mine = [entry for entry in entries if entry["index"] % num_processes == process]
  write_jsonl_atomically(part_path(output_dir, teacher, chunk, process, num_processes), mine)


def read_chunk(output_dir: str, teacher: str, chunk: int, num_processes: int) -> dict[int, dict]:
  """{index: entry} of a committed chunk."""
  entries = {}
  for process in range(num_processes):
    path = part_path(output_dir, teacher, chunk, process, num_processes)
    for line in path.read_text().splitlines():
      entry = json.loads(line)
      entries[entry["index"]] = entry
  return entries


class Manifest:
  """One process's record of what it committed (informational: the part files are the commits)."""

  def __init__(self, output_dir: str, process: int, num_processes: int):
    self.path = epath.Path(output_dir) / "manifests" / f"process-{process:05d}-of-{num_processes:05d}.json"
    self.data = json.loads(self.path.read_text()) if self.path.exists() else {
        "process": process, "num_processes": num_processes, "committed": []}

  def add(self, teacher: str, chunk: int, records: int, rejected: int, new_tokens: int, seconds: float) -> None:
    self.data["committed"].append({"teacher": teacher, "chunk": chunk, "records": records, "rejected": rejected,
                                   "new_tokens": new_tokens, "seconds": round(seconds, 3),
                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    write_atomically(self.path, json.dumps(self.data, indent=1))

  def seconds(self) -> float:
    return sum(entry["seconds"] for entry in self.data["committed"])


def reason_kind(reason: str) -> str:
  """A reject reason without its particulars (numbers, quoted values), for counting in the summary."""
  kind = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason.split(" (")[0])
  return re.sub(r"(?<![\w-])\d+(?![\w-])", "N", kind)[:80]


def merged_rows(entries_by_chunk: Iterator[tuple[list, dict[str, dict[int, dict]]]], merge_record
                ) -> Iterator[tuple[str, dict]]:
  """("annotated" | "rejected", row) in input order, from (chunk items, {teacher: {index: entry}}) pairs.

  `merge_record(item, {teacher: entry})` returns the merged records (one per sample) or raises the record's
  `formats.BadRecord`.
  """
  for items, entries in entries_by_chunk:
    for item in items:
      index = item[0]
      per_teacher = {teacher: chunk_entries.get(index) for teacher, chunk_entries in entries.items()}
      missing = [teacher for teacher, entry in per_teacher.items() if entry is None]
      if missing:
        raise RuntimeError(f"input record {index} has no committed entry for teachers {missing}: the work files "
                           "changed under the run; delete the affected chunk files and resume")
      rejected = next((entry["rejected"] for entry in per_teacher.values() if "rejected" in entry), None)
      if rejected is not None:
        yield "rejected", {"index": index, **rejected}
      else:
        for row in merge_record(item, per_teacher):
          yield "annotated", row


def write_merged(output_dir: str, rows: Iterable[tuple[str, dict]]) -> collections.Counter:
  """Writes annotated.jsonl and rejects.jsonl from ("annotated" | "rejected", row) pairs (temporary names, renamed
  when both are complete); returns the counts and the reject kinds."""
  directory = epath.Path(output_dir)
  paths = {"annotated": directory / OUTPUT_FILE, "rejected": directory / REJECTS_FILE}
  temporary = {kind: path.parent / f".{path.name}.tmp-{os.getpid()}" for kind, path in paths.items()}
  counts: collections.Counter = collections.Counter()
  handles = {kind: path.open("w") for kind, path in temporary.items()}
  try:
    for kind, row in rows:
      handles[kind].write(json.dumps(row, ensure_ascii=False) + "\n")
      counts[kind] += 1
      if kind == "rejected":
        counts[f"reject: {reason_kind(row['reason'])}"] += 1
  finally:
    for handle in handles.values():
      handle.close()
  for kind, path in paths.items():
    temporary[kind].replace(path)
  return counts
