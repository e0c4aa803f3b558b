"""Looking tasks up by name, with the help users of seqio/T5X need when a name is not registered."""

from __future__ import annotations

import difflib

import seqio

from tasks import students


def all_names() -> list[str]:
  """Every registered task and mixture name."""
  return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def get_mixture_or_task(name: str) -> seqio.Task | seqio.Mixture:
  """The task or mixture called `name`, after registering the gin-configured user datasets.

  An unknown name raises a `ValueError` that lists the closest registered names and says whether the teacherlm tasks
  are registered at all (a missing `import tasks` is the most common cause).
  """
  students.user_datasets()
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    pass
  names = all_names()
  close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
  ours = [n for n in names if n.startswith("teacherlm_")]
  hint = (f"{len(ours)} teacherlm tasks and mixtures are registered" if ours else
          "no teacherlm task is registered: add `import tasks` to your gin file (or Python program) first")
  suggestion = f"; closest: {close}" if close else ""
  raise ValueError(f"no seqio task or mixture named {name!r}{suggestion} ({hint})")
