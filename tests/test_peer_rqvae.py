"""launch/bench/peers/bench_torch_rqvae.py: the PyTorch peer of bench_identifiers' RQ-VAE epochs.

The project never depends on torch, so the flag and import checks read the scripts' source
with `ast`; the end-to-end run needs a Python with torch: this one, or the interpreter named
by the TORCH_PYTHON environment variable (e.g. /tmp/hfvenv/bin/python), else it is skipped.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = os.path.join(REPO, "launch", "bench", "bench_identifiers.py")
PEER = os.path.join(REPO, "launch", "bench", "peers", "bench_torch_rqvae.py")


def parse(path):
  with open(path, encoding="utf-8") as f:
    return ast.parse(f.read(), path)


def flags(path):
  """{option strings: {"default": ..., "type": ...}} of every visible add_argument call."""
  out = {}
  for node in ast.walk(parse(path)):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"):
      continue
    kw = {k.arg: k.value for k in node.keywords}
    if "help" in kw and ast.unparse(kw["help"]) == "argparse.SUPPRESS":
      continue  # internal (bench_identifiers' --worker)
    names = frozenset(a.value for a in node.args)
    out[names] = {"default": ast.literal_eval(kw["default"]) if "default" in kw else None,
                  "type": ast.unparse(kw["type"]) if "type" in kw else None}
  return out


def test_peer_takes_every_bench_identifiers_flag_with_the_same_default():
  ours, peer = flags(OURS), flags(PEER)
  assert {"--sizes", "--semantic-dim", "--collaborative-dim", "--epochs", "--codebook-size",
          "--batch-size"} <= set().union(*ours)
  for names, spec in ours.items():
    match = [p for p in peer if names <= p]
    assert match, f"the peer lacks {sorted(names)}"
    assert peer[match[0]] == spec, f"{sorted(names)}: ours {spec}, peer {peer[match[0]]}"


def imports(tree, top_level_only=False):
  """{module name: ImportFrom node or None} of every import (of the module body only)."""
  out = {}
  for node in (tree.body if top_level_only else ast.walk(tree)):
    if isinstance(node, ast.Import):
      out.update((a.name, None) for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      out[node.module] = node
  return out


def test_peer_runs_without_the_project_and_trains_on_bench_identifiers_tables():
  """It must start in a torch-only environment: no gensar_jax, no JAX, from the repository
  root as `python -m launch.bench.peers.bench_torch_rqvae` (launch/ is found there, not
  installed); and the data are bench_identifiers' own synthetic_tables (imported, not a copy
  that could drift), which imports nothing of the project at module level."""
  tree = parse(PEER)
  assert ast.get_docstring(tree)
  imported = imports(tree)
  ours = imported.get("launch.bench.bench_identifiers")
  assert ours is not None and [a.name for a in ours.names] == ["synthetic_tables"]
  project = {"gensar_jax", "gensar_tasks", "jax", "flax", "optax", "gin", "seqio"}
  roots = {name.split(".")[0] for name in imported}
  assert "torch" in roots and not roots & project
  assert [m for m in imported if m.split(".")[0] == "launch"] == [
      "launch.bench.bench_identifiers"]
  assert not {name.split(".")[0] for name in imports(parse(OURS), top_level_only=True)} & project
  defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
  assert "synthetic_tables" not in defined


def torch_python():
  if os.environ.get("TORCH_PYTHON"):
    return os.environ["TORCH_PYTHON"]
  pytest.importorskip("torch")
  return sys.executable


def test_peer_end_to_end_at_a_tiny_size(tmp_path):
  python = torch_python()
  out = tmp_path / "peer.json"
  proc = subprocess.run(
      [python, "-m", "launch.bench.peers.bench_torch_rqvae", "--sizes", "300,512",
       "--semantic-dim", "48", "--collaborative-dim", "16", "--codebook-size", "8",
       "--batch-size", "128", "--epochs", "2", "--threads", "1", "--device", "cpu",
       "--json_out", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert json.loads(out.read_text()) == result
  assert result["threads"] == 1 and result["torch"] and result["device"] == "cpu"
  assert [r["items"] for r in result["rows"]] == [300, 512]
  for row in result["rows"]:
    assert row["epochs"] == 2 and len(row["epoch_seconds"]) == 2
    assert row["epoch_s"] > 0 and row["warmup_s"] > 0
    assert row["train_items_per_s"] == pytest.approx(row["items"] / row["epoch_s"])
    assert 0 < row["loss"] < 1 and row["loss"] == pytest.approx(
        row["recon_loss"] + row["quant_loss"], rel=1e-5)
  # Encoders 48->...->32 and 16->...->32, mirrored decoders, 2 x 8 x 64 + 2 x 2 x 8 x 32.
  widths = (512, 256, 128, 64, 32)
  mlp = lambda dims: sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
  expected = sum(mlp((d,) + widths) + mlp(widths[::-1] + (d,)) for d in (48, 16))
  assert result["rows"][0]["params"] == expected + 2 * 8 * 64 + 2 * 2 * 8 * 32
