"""Writing outputs so that a directory either exists complete or not at all."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_output_dir(output_dir: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling directory that is renamed to `output_dir` on success.

  On any exception the temporary directory is removed and `output_dir` is left as it was,
  so a reader never sees a half-written output that looks complete.
  """
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and not overwrite:
    raise FileExistsError(f"{output_dir} already exists; pass overwrite=True to replace it")
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = f"{output_dir}.tmp-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.exists(output_dir):
    old = f"{output_dir}.old-{uuid.uuid4().hex[:8]}"
    os.rename(output_dir, old)
  os.rename(tmp, output_dir)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=False)
    f.write("\n")


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False))
      f.write("\n")


def read_jsonl(path: str) -> list:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
