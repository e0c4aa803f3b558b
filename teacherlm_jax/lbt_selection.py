"""Learning by teaching's choices from scores: the answer per teaching problem (M1) and DPO preference pairs (M2).

Pure functions over score rows (`lbt.score` writes them): one row per candidate of a teaching problem (TP) with
`candidate` (k), `answer` (the teacher's answer TA, a letter), `lbt_score` (the students' mean exam accuracy when
taught with the candidate) and `gold_log_likelihood` (their mean log-likelihood of the exam answers, the
tie-breaker). M1 answers a TP without its gold letter:

  greedy            the TA of the teacher's greedy (temperature 0) solution
  self_consistency  the most frequent TA among the K samples (majority vote; a tie goes to the answer sampled first)
  lbt_max           the TA of the candidate with the best (lbt_score, gold_log_likelihood)
  lbt_sum           the TA whose candidates' LbT scores sum highest
  lbt_mean          the TA whose candidates' mean LbT score is highest
A tie between answer groups under lbt_sum / lbt_mean goes to the group holding the lbt_max candidate among them.
Nothing here reads a TP's gold letter except `is_correct` (for M2's correctness pairs and `lbt report`).

M2 pairs (chosen above rejected), per TP, at most `max_pairs` (the largest LbT gap first; `correctness` in candidate
order, so that no LbT score decides):
  correctness       every correct candidate above every incorrect one (needs the TP's gold letter)
  lbt               a higher LbT score above a lower one, by more than `min_gap`
  correctness+lbt   correct above incorrect, and among the correct a higher LbT score above a lower one
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

METHODS = ("greedy", "self_consistency", "lbt_max", "lbt_sum", "lbt_mean")
PAIRINGS = ("correctness", "lbt", "correctness+lbt")


def _rank(row: dict) -> tuple:
  return (row["lbt_score"], row["gold_log_likelihood"], -row["candidate"])


def best(candidates: Sequence[dict]) -> dict:
  """The candidate with the highest (lbt_score, gold_log_likelihood); ties go to the lowest candidate number."""
  return max(candidates, key=_rank)


def self_consistency(candidates: Sequence[dict]) -> str:
  """The most frequent answer; a tie goes to the answer that was sampled first (lowest candidate number)."""
  ordered = sorted(candidates, key=lambda r: r["candidate"])
  counts: dict[str, int] = {}
  for row in ordered:
    counts[row["answer"]] = counts.get(row["answer"], 0) + 1
  return max(counts, key=lambda answer: (counts[answer], -next(i for i, r in enumerate(ordered)
                                                               if r["answer"] == answer)))


def _groups(candidates: Sequence[dict]) -> dict[str, list[dict]]:
  groups: dict[str, list[dict]] = {}
  for row in candidates:
    groups.setdefault(row["answer"], []).append(row)
  return groups


def grouped(candidates: Sequence[dict], aggregate: str) -> str:
  """The answer whose group's LbT scores have the highest sum or mean; ties by the best candidate in the group."""
  groups = _groups(candidates)
  def value(answer: str) -> tuple:
    scores = [row["lbt_score"] for row in groups[answer]]
    total = sum(scores) if aggregate == "sum" else sum(scores) / len(scores)
    return (round(total, 9), _rank(best(groups[answer])))
  return max(groups, key=value)


def choose(method: str, candidates: Sequence[dict], greedy_answer: Optional[str] = None) -> str:
  """The answer a method picks for one TP (its candidates' score rows; `greedy_answer` for 'greedy')."""
  if method == "greedy":
    if greedy_answer is None:
      raise ValueError("method 'greedy' needs the greedy solution's answer")
    return greedy_answer
  if method == "self_consistency":
    return self_consistency(candidates)
  if method == "lbt_max":
    return best(candidates)["answer"]
  if method in ("lbt_sum", "lbt_mean"):
    return grouped(candidates, method[len("lbt_"):])
  raise ValueError(f"selection method {method!r} is not one of {METHODS}")


def representative(method: str, candidates: Sequence[dict], answer: str) -> dict:
  """The candidate kept for the chosen answer: its best-scored one (self_consistency: its first sampled one, since
  that method does not use LbT scores)."""
  group = [row for row in candidates if row["answer"] == answer]
  if not group:
    raise ValueError(f"no candidate answers {answer!r} (the greedy solution's answer was never sampled)")
  if method == "self_consistency":
    return min(group, key=lambda r: r["candidate"])
  return best(group)


def is_correct(row: dict, gold: str) -> bool:
  """Whether a candidate's answer is the TP's gold letter (reads the gold: M2's correctness pairs, `lbt report`)."""
  return row["answer"] == gold


def preference_pairs(candidates: Sequence[dict], pairing: str, gold: Optional[str] = None, min_gap: float = 0.0,
                     max_pairs: int = 4) -> list[tuple[dict, dict]]:
  """(chosen, rejected) candidate rows of one TP under a pairing mode (see the module docstring)."""
  if pairing not in PAIRINGS:
    raise ValueError(f"pairs_from must be one of {PAIRINGS}, got {pairing!r}")
  if pairing != "lbt" and gold is None:
    raise ValueError(f"pairs_from {pairing!r} needs the teaching problem's gold answer")
  pairs = []
  for a, b in itertools.permutations(candidates, 2):
    if pairing == "lbt":
      keep = a["lbt_score"] - b["lbt_score"] > min_gap
    else:
      keep = is_correct(a, gold) and not is_correct(b, gold)
      if pairing == "correctness+lbt" and is_correct(a, gold) and is_correct(b, gold):
        keep = a["lbt_score"] - b["lbt_score"] > min_gap
    if keep:
      pairs.append((a, b))
  if pairing == "correctness":  # no LbT score decides which pairs are kept
    pairs.sort(key=lambda p: (p[0]["candidate"], p[1]["candidate"]))
  else:
    pairs.sort(key=lambda p: (-(p[0]["lbt_score"] - p[1]["lbt_score"]), p[0]["candidate"], p[1]["candidate"]))
  return pairs[:max_pairs]
