"""T5X-style gin command-line flags: `--gin_file=PATH` (repeatable), `--gin.NAME=VALUE`, `--gin_bindings=...`."""

from __future__ import annotations

import os
from typing import Sequence

import gin

GIN_SEARCH_PATHS = (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
  """(gin files, bindings, other args) from argv; `--gin.A.b=1` becomes the binding `A.b=1`."""
  files, bindings, rest = [], [], []
  args = list(argv)
  while args:
    arg = args.pop(0)
    name, has_value, value = arg.partition("=")
    if name in ("--gin_file", "--gin_bindings") and not has_value:
      if not args:
        raise ValueError(f"{name} needs a value")
      value, has_value = args.pop(0), True
    if name == "--gin_file":
      files.append(value)
    elif name == "--gin_bindings":
      bindings.append(value)
    elif name.startswith("--gin.") and has_value:
      bindings.append(f"{name[len('--gin.'):]}={value}")
    else:
      rest.append(arg)
  return files, bindings, rest


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files (looked up in the working directory, then the repository root) and bindings."""
  for path in GIN_SEARCH_PATHS:
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False)
