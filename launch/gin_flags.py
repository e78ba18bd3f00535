"""Gin flags on a launcher's command line, shared by sweep.py and tpu_pod.py.

Both launchers pass the gin flags they are given (--gin_file=..., --gin.NAME=VALUE,
--gin_bindings=...) through to the trainer verbatim and parse only the rest themselves, so
the split has to agree between them: a flag one of them forwards, the other must forward
too. Standard library only: tpu_pod.py runs on a laptop that has gcloud but not the
training dependencies.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Type

GIN_FLAG_PREFIXES = ("--gin_file", "--gin_bindings", "--gin.")


def split_gin_flags(argv: Sequence[str], error: Type[Exception] = ValueError
                    ) -> Tuple[List[str], List[str]]:
  """(gin flags, verbatim and in order; the launcher's own flags).

  `--gin_file PATH` and `--gin_bindings TEXT` (space-separated) are joined into one
  `--flag=value` word; a gin flag without a value raises `error`, the caller's own
  exception class, so it is reported like the caller's other flag errors.
  """
  gin_flags, own = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith(GIN_FLAG_PREFIXES):
      if arg in ("--gin_file", "--gin_bindings"):  # space-separated value
        if i + 1 >= len(args):
          raise error(f"{arg} needs a value")
        arg, i = f"{arg}={args[i + 1]}", i + 1
      elif "=" not in arg:
        raise error(f"{arg!r}: gin flags take a value (--gin.NAME=VALUE)")
      gin_flags.append(arg)
    else:
      own.append(arg)
    i += 1
  return gin_flags, own


def quote_gin_string(text: str) -> str:
  """A Python string as a single-quoted gin string literal (backslashes, quotes escaped)."""
  return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def unquote_gin_string(value: str) -> str:
  """The text of a gin value with one pair of outer quotes removed, if it has them.

  Not a full unescape: it is for reading paths and names (MODEL_DIR='gs://...') out of
  flags and gin files, where escapes do not occur; any other value comes back stripped.
  """
  value = value.strip()
  if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
    return value[1:-1]
  return value
