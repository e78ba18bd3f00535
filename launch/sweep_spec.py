"""A sweep's spec (JSON) and the points it expands to, for launch/sweep.py.

The spec names the gin files and bindings every point shares, and the points: the product
of a `grid` ({binding: [values]}) and/or an explicit list `points` ([{binding: value}]),
each listed point crossed with the grid. Values become gin text here, once, so that the
point files, the commands and the summary all show the same text. Every field is checked
on load, with errors that name the field, because a typo found after hours of training is
a lost sweep. Standard library only, like the launchers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
from typing import Any, Dict, List, Mapping

BINDING_KEY = re.compile(r"[A-Za-z_][\w./]*")
SPEC_KEYS = {"name", "gin_files", "bindings", "grid", "points", "short_names", "evaluate",
             "metric", "mode", "select"}
MAX_NAME = 80


class SweepError(Exception):
  """A bad spec or flag; printed as one line, exit code 2."""


def gin_literal(value: Any, where: str) -> str:
  """A JSON value as gin text; strings are taken as gin text already."""
  if isinstance(value, str):
    if not value.strip():
      raise SweepError(f"{where}: empty binding value")
    return value
  if value is None or isinstance(value, bool):
    return repr(value)
  if isinstance(value, (int, float)):
    if isinstance(value, float) and not math.isfinite(value):
      raise SweepError(f"{where}: {value} is not a gin number")
    return repr(value)
  if isinstance(value, list):
    return "[" + ", ".join(gin_literal(v, where) for v in value) + "]"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{gin_literal(k, where)}: {gin_literal(v, where)}"
                           for k, v in value.items()) + "}"
  raise SweepError(f"{where}: unsupported value {value!r}")


def _bindings(obj: Any, where: str) -> Dict[str, str]:
  if not isinstance(obj, dict):
    raise SweepError(f"{where}: expected an object {{binding: value}}, got {obj!r}")
  out = {}
  for key, value in obj.items():
    if not BINDING_KEY.fullmatch(key):
      raise SweepError(f"{where}: {key!r} is not a gin binding name (NAME, fn.param, "
                       "scope/fn.param)")
    out[key] = gin_literal(value, f"{where}.{key}")
  return out


def load_spec(path: str) -> Dict[str, Any]:
  """The spec with defaults filled in and every field checked (errors name the field)."""
  try:
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
  except FileNotFoundError:
    raise SweepError(f"--spec={path}: file not found") from None
  except json.JSONDecodeError as e:
    raise SweepError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(spec, dict):
    raise SweepError(f"{path}: expected a JSON object")
  unknown = sorted(set(spec) - SPEC_KEYS)
  if unknown:
    raise SweepError(f"{path}: unknown field(s) {unknown}; known: {sorted(SPEC_KEYS)}")
  files = spec.get("gin_files")
  if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
    raise SweepError(f"{path}: gin_files must be a non-empty list of gin file paths")
  grid = spec.get("grid", {})
  if not isinstance(grid, dict):
    raise SweepError(f"{path}: grid must be an object {{binding: [values]}}")
  for key, values in grid.items():
    if not isinstance(values, list) or not values:
      raise SweepError(f"{path}: grid.{key} must be a non-empty list of values")
  points = spec.get("points", [{}])
  if not isinstance(points, list) or not points:
    raise SweepError(f"{path}: points must be a non-empty list of {{binding: value}}")
  evaluate = spec.get("evaluate", {})
  if not isinstance(evaluate, dict) or set(evaluate) - {"gin_files", "bindings"}:
    raise SweepError(f"{path}: evaluate must be an object with gin_files and bindings")
  mode = spec.get("mode", "min")
  if mode not in ("min", "max"):
    raise SweepError(f"{path}: mode must be 'min' or 'max', got {mode!r}")
  select = spec.get("select", "best")
  if select not in ("best", "last"):
    raise SweepError(f"{path}: select must be 'best' or 'last', got {select!r}")
  short_names = spec.get("short_names", {})
  if not isinstance(short_names, dict):
    raise SweepError(f"{path}: short_names must be an object {{binding: short name}}")
  return {
      "name": spec.get("name", os.path.splitext(os.path.basename(path))[0]),
      "gin_files": files,
      "bindings": _bindings(spec.get("bindings", {}), f"{path}: bindings"),
      "grid": {k: [gin_literal(v, f"{path}: grid.{k}[{i}]") for i, v in enumerate(vs)]
               for k, vs in _check_keys(grid, f"{path}: grid").items()},
      "points": [_bindings(p, f"{path}: points[{i}]") for i, p in enumerate(points)],
      "short_names": {str(k): str(v) for k, v in short_names.items()},
      "evaluate_gin_files": list(evaluate.get("gin_files", ["gin/runs/evaluate.gin"])),
      "evaluate_bindings": _bindings(evaluate.get("bindings", {}), f"{path}: evaluate"),
      "metric": str(spec.get("metric", "loss")), "mode": mode, "select": select,
  }


def _check_keys(grid: Mapping[str, Any], where: str) -> Mapping[str, Any]:
  for key in grid:
    if not BINDING_KEY.fullmatch(key):
      raise SweepError(f"{where}: {key!r} is not a gin binding name")
  return grid


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the sweep: its place in the spec's order and what it sets on top."""
  index: int
  name: str
  bindings: Dict[str, str]  # binding -> gin text, what this point sets


def _name_part(key: str, value: str, short_names: Mapping[str, str]) -> str:
  short = short_names.get(key) or key.split("/")[-1].split(".")[-1].lower()
  text = re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-") or "x"
  return f"{short}-{text}"


def expand_points(spec: Mapping[str, Any]) -> List[Point]:
  """Each listed point crossed with the grid, named by the values that vary."""
  grid_keys = list(spec["grid"])
  combos = [dict(zip(grid_keys, values))
            for values in itertools.product(*(spec["grid"][k] for k in grid_keys))]
  raw = [{**listed, **combo} for listed in spec["points"] for combo in combos]
  varying = [k for k in dict.fromkeys(k for b in raw for k in b)
             if len({b.get(k) for b in raw}) > 1]
  names = []
  for bindings in raw:
    name = "_".join(_name_part(k, bindings[k], spec["short_names"])
                    for k in varying if k in bindings) or "base"
    if len(name) > MAX_NAME:
      name = name[:MAX_NAME].rstrip("_-")
    names.append(name)
  points = []
  for i, (name, bindings) in enumerate(zip(names, raw)):
    if names.count(name) > 1 or len(name) == MAX_NAME:
      digest = hashlib.sha1(json.dumps(bindings, sort_keys=True).encode()).hexdigest()[:6]
      name = f"{name}-{digest}"
    points.append(Point(index=i, name=name, bindings=bindings))
  if len({p.name for p in points}) != len(points):
    raise SweepError("two points have the same bindings; the grid lists a value twice")
  return points
