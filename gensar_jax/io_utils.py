"""The one filesystem layer for run directories: local paths and `gs://` alike.

Every read and write of a run directory (MODEL_DIR, results, exports, pipeline markers,
sweeps) goes through these functions, so a path on a bucket works wherever a local one does.
Remote paths are handled by `etils.epath`, the layer orbax and TFDS already use (it picks
tf.io.gfile when TensorFlow is importable, fsspec/gcsfs with `EPATH_USE_TF=0`).

Object stores are not filesystems, and the differences decide the shape of this module:
  - An object upload appears whole or not at all, so a remote file write needs no
    temporary name; a local one writes `<name>.tmp-*` and renames it.
  - Objects cannot be appended to (gcsfs silently overwrites in mode "a"), so
    `append_text` on a bucket reads the object and writes it back with the new lines.
    That is fine for the small logs it is used for (metrics.jsonl, stage logs).
  - There is no rename: moving a remote directory copies every object, then deletes.
  - Other processes write the same run directory (the hosts of a pod, a trainer whose
    metrics a sweep reads back), so gcsfs's listing cache, which would serve stale sizes
    and listings, is switched off for gs:// (fsspec's per-protocol defaults).
  - A directory cannot appear atomically. `atomic_output_dir` on a bucket builds the
    output in a local temporary directory and uploads it when the block succeeds, so a
    failure leaves nothing behind; a reader racing the upload can see a partial output.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Iterable, Iterator, List, Optional, Union

from etils import epath
import fsspec

PathLike = Union[str, os.PathLike]

fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def is_remote(path: PathLike) -> bool:
  """True for URLs with a scheme (gs://, s3://), which local calls would mistake for dirs."""
  return "://" in os.fspath(path)


def join(path: PathLike, *parts: str) -> str:
  """os.path.join that keeps `gs://bucket` URLs intact."""
  if is_remote(path):
    return str(epath.Path(path).joinpath(*parts))
  return os.path.join(os.fspath(path), *parts)


def _path(path: PathLike) -> epath.Path:
  return epath.Path(os.fspath(path))


# ---------------------------------------------------------------------- queries


def exists(path: PathLike) -> bool:
  return _path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: PathLike) -> bool:
  return _path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: PathLike) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  p = _path(path)
  return p.exists() and not p.is_dir()


def mtime(path: PathLike) -> float:
  """Modification time in seconds since the epoch (FileNotFoundError if missing)."""
  if is_remote(path):
    return float(_path(path).stat().mtime)
  return os.path.getmtime(path)


def listdir(path: PathLike) -> List[str]:
  """Names of the entries of a directory (not recursive), sorted."""
  if is_remote(path):
    return sorted(p.name for p in _path(path).iterdir())
  return sorted(os.listdir(path))


# ---------------------------------------------------------------------- reads


def read_text(path: PathLike) -> str:
  if is_remote(path):
    return _path(path).read_text(encoding="utf-8")
  with open(path, encoding="utf-8") as f:
    return f.read()


def read_text_if_exists(path: PathLike) -> Optional[str]:
  """A file's text, or None when it does not exist (not written yet)."""
  try:
    return read_text(path)
  except FileNotFoundError:
    return None


def read_json_if_valid(path: PathLike) -> Optional[Any]:
  """A JSON file's value, or None when it is missing or not valid JSON (half-written)."""
  text = read_text_if_exists(path)
  try:
    return None if text is None else json.loads(text)
  except json.JSONDecodeError:
    return None


def read_bytes(path: PathLike) -> bytes:
  if is_remote(path):
    return _path(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def read_json(path: PathLike) -> Any:
  return json.loads(read_text(path))


def read_jsonl(path: PathLike) -> list:
  return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


# ---------------------------------------------------------------------- writes


def makedirs(path: PathLike) -> None:
  """Creates a directory and its parents (on a bucket a no-op beyond a marker object)."""
  if is_remote(path):
    _path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes a file so that readers see the old content or the new, never a torn one."""
  if is_remote(path):
    _path(path).write_bytes(data)  # one object upload: whole or nothing
    return
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: PathLike, rows: Iterable[dict]) -> None:
  write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def append_text(path: PathLike, text: str) -> None:
  """Appends to a log; on a bucket, rewrites the object (objects cannot be appended to)."""
  if is_remote(path):
    old = read_text(path) if exists(path) else ""
    write_text(path, old + text)
    return
  with open(path, "a", encoding="utf-8") as f:
    f.write(text)


def remove(path: PathLike) -> None:
  """Removes a file; a missing one is not an error."""
  if is_remote(path):
    if _path(path).exists():
      _path(path).unlink()
  elif os.path.exists(path):
    os.remove(path)


def rmtree(path: PathLike) -> None:
  """Removes a directory tree; a missing one is not an error."""
  if is_remote(path):
    if _path(path).exists():
      _path(path).rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def _walk_files(root: PathLike) -> Iterator[str]:
  """Paths relative to `root` of every file under it."""
  if is_remote(root):
    base = _path(root)
    stack = [base]
    while stack:
      directory = stack.pop()
      for child in directory.iterdir():
        if child.is_dir():
          stack.append(child)
        else:
          yield os.path.relpath(str(child), str(base))
    return
  for dirpath, _, filenames in os.walk(root):
    for name in filenames:
      yield os.path.relpath(os.path.join(dirpath, name), root)


def copytree(src: PathLike, dst: PathLike) -> None:
  """Copies every file under `src` to the same place under `dst` (either may be remote)."""
  for relative in sorted(_walk_files(src)):
    write_bytes(join(dst, *relative.split(os.sep)), read_bytes(join(src, *relative.split(os.sep))))


def move(src: PathLike, dst: PathLike) -> None:
  """Moves a file or directory; on a bucket by copying every object, then deleting."""
  if not is_remote(src) and not is_remote(dst):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    shutil.move(os.fspath(src), os.fspath(dst))
    return
  if isdir(src):
    copytree(src, dst)
    rmtree(src)
  else:
    write_bytes(dst, read_bytes(src))
    remove(src)


@contextlib.contextmanager
def atomic_output_dir(output_dir: PathLike, overwrite: bool = False) -> Iterator[str]:
  """Yields a local directory to write an output into; it becomes `output_dir` on success.

  Locally, a temporary sibling is renamed into place, so a reader never sees a
  half-written output that looks complete. For a bucket, the yielded directory is a local
  temporary one that is uploaded when the block succeeds (see the module docstring). On any
  exception nothing is written to `output_dir` and the temporary directory is removed.
  """
  if exists(output_dir) and not overwrite:
    raise FileExistsError(f"{output_dir} already exists; pass overwrite=True to replace it")
  if is_remote(output_dir):
    with tempfile.TemporaryDirectory(prefix="gensar-upload-") as tmp:
      yield tmp
      rmtree(output_dir)
      copytree(tmp, output_dir)
    return
  output_dir = os.path.abspath(output_dir)
  os.makedirs(os.path.dirname(output_dir), exist_ok=True)
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
