"""Serving benchmark: a loopback load test of the search/recommend server (throughput, latency,
errors). Run from the repository root:

  .venv/bin/python -m launch.bench.bench_serving --artifact=runs/tiny/export    # starts a server
  .venv/bin/python -m launch.bench.bench_serving --artifact=DIR --url=http://127.0.0.1:8000

N concurrent httpx clients send a seeded mix of /search and /recommend requests (histories
of real catalogue items, queries made from item titles) until `--requests` have been sent
or `--duration_s` has passed, whichever comes first. Without --url it starts
`python -m gensar_jax.serve` on a free loopback port, waits for /readyz (so compilation is
not timed), runs, and stops it. Prints one table (requests/s, p50/p99 latency, errors per
endpoint); --json prints the same numbers as one JSON line. Exit code 1 if any request
failed or the server died.

`--concurrency=16,64,256` runs one level after another against the same server and adds a
table of the levels. A 503 (the server's admission limit, `serve --max_queue`) is counted
as *shed*, not as an error: latency percentiles are over the admitted (200) requests, which
is what bounded admission keeps bounded.

`--raw` then measures, in this process after the server has stopped, the same requests
without HTTP, queueing or batching delays: the artifact's compiled search/recommend
functions on pre-tokenised full batches of the largest bucket ("compiled function"), and the
same plus prompt rendering and tokenising ("engine"). A line after the tables gives the
ratio of the server's best requests/s to the compiled function's: what HTTP and the batcher
cost.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import httpx
import numpy as np

from gensar_jax.serving.artifact import read_items

ENDPOINTS = ("search", "recommend")


def make_bodies(items: Sequence[Dict[str, Any]], count: int, search_fraction: float, k: int,
                seed: int) -> List[Dict[str, Any]]:
  """`count` (endpoint, body) requests; histories of 1-10 events, queries from titles."""
  rng = random.Random(seed)
  ids = [str(r["item_id"]) for r in items]
  words = sorted({w.lower() for r in items for w in str(r["title"]).split() if w.isalpha()})
  words = words or ["item"]
  bodies = []
  for _ in range(count):
    history = []
    for _ in range(rng.randint(1, 10)):
      if rng.random() < 0.5:
        history.append({"kind": "rec", "item_id": rng.choice(ids)})
      else:
        history.append({"kind": "search", "item_id": rng.choice(ids),
                        "query": " ".join(rng.sample(words, min(2, len(words))))})
    body: Dict[str, Any] = {"history": history, "k": k}
    if rng.random() < search_fraction:
      body["query"] = " ".join(rng.sample(words, min(2, len(words))))
      bodies.append({"endpoint": "search", "body": body})
    else:
      bodies.append({"endpoint": "recommend", "body": body})
  return bodies


async def _run(url: str, bodies: Sequence[Dict[str, Any]], concurrency: int,
               duration_s: float, timeout_s: float) -> Dict[str, Any]:
  records: List[Dict[str, Any]] = []
  next_index = 0
  start = time.perf_counter()
  deadline = start + duration_s

  async def client():
    nonlocal next_index
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as http:
      while next_index < len(bodies) and time.perf_counter() < deadline:
        request = bodies[next_index]
        next_index += 1
        sent = time.perf_counter()
        try:
          response = await http.post(f"/{request['endpoint']}", json=request["body"])
          status = response.status_code
          ok = status == 200 and len(response.json()["items"]) > 0
          error = None if ok or status == 503 else f"HTTP {status}: {response.text[:200]}"
        except Exception as e:  # pylint: disable=broad-except
          status, error = None, f"{type(e).__name__}: {e}"
        records.append({"endpoint": request["endpoint"], "error": error, "status": status,
                        "latency_s": time.perf_counter() - sent})

  await asyncio.gather(*(client() for _ in range(concurrency)))
  return {"records": records, "wall_s": time.perf_counter() - start}


def summarise(records: Sequence[Dict[str, Any]], wall_s: float) -> Dict[str, Dict[str, Any]]:
  rows = {}
  for name in (*ENDPOINTS, "all"):
    picked = [r for r in records if name == "all" or r["endpoint"] == name]
    admitted = [r for r in picked if r.get("status") == 200]
    latencies = np.asarray([r["latency_s"] for r in admitted]) * 1000.0   # [n] ms
    shed = sum(r.get("status") == 503 for r in picked)
    rows[name] = {
        "requests": len(picked),
        "errors": sum(r["error"] is not None for r in picked),
        "shed_503": shed,
        "shed_rate": shed / len(picked) if picked else 0.0,
        "requests_per_s": len(admitted) / wall_s if wall_s > 0 else 0.0,
        "p50_ms": float(np.percentile(latencies, 50)) if len(admitted) else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if len(admitted) else float("nan"),
    }
  return rows


def format_table(rows: Dict[str, Dict[str, Any]], concurrency: int, wall_s: float) -> str:
  lines = [f"load test: {concurrency} concurrent clients, {wall_s:.1f} s "
           "(req/s and latency of admitted requests)",
           f"{'endpoint':<10} {'requests':>9} {'errors':>7} {'503':>6} {'req/s':>9} "
           f"{'p50 ms':>9} {'p99 ms':>9}", "-" * 65]
  for name, r in rows.items():
    lines.append(f"{name:<10} {r['requests']:>9d} {r['errors']:>7d} {r['shed_503']:>6d} "
                 f"{r['requests_per_s']:>9.1f} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f}")
  return "\n".join(lines)


def format_levels(results: Sequence[Dict[str, Any]]) -> str:
  lines = ["| clients | requests | admitted req/s | p50 ms | p99 ms | 503 rate | errors |",
           "|---|---|---|---|---|---|---|"]
  for result in results:
    r = result["rows"]["all"]
    lines.append(f"| {result['concurrency']} | {r['requests']} | {r['requests_per_s']:.1f} | "
                 f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['shed_rate']:.1%} | "
                 f"{r['errors']} |")
  return "\n".join(lines)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_ready(url: str, server: Optional[subprocess.Popen], timeout_s: float) -> None:
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if server is not None and server.poll() is not None:
      raise RuntimeError(f"the server exited with code {server.returncode} before it was ready")
    try:
      if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
        return
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  raise TimeoutError(f"{url}/readyz not ready after {timeout_s:.0f} s")


def start_server(artifact: str, port: int, max_batch: Optional[int],
                 max_wait_ms: float, log_path: str, max_queue: Optional[int] = None
                 ) -> subprocess.Popen:
  command = [sys.executable, "-m", "gensar_jax.serve", f"--artifact={artifact}",
             "--host=127.0.0.1", f"--port={port}", f"--max_wait_ms={max_wait_ms}",
             "--log_level=warning"]
  if max_queue:
    command.append(f"--max_queue={max_queue}")
  if max_batch:
    command.append(f"--max_batch={max_batch}")
  log = open(log_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
  return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def stop_server(server: subprocess.Popen) -> None:
  server.terminate()
  try:
    server.wait(timeout=20)
  except subprocess.TimeoutExpired:
    server.kill()
    server.wait()


def run_load_test(url: str, items: Sequence[Dict[str, Any]], requests: int, concurrency: int,
                  duration_s: float, search_fraction: float = 0.5, k: int = 10, seed: int = 0,
                  timeout_s: float = 60.0) -> Dict[str, Any]:
  bodies = make_bodies(items, requests, search_fraction, k, seed)
  out = asyncio.run(_run(url, bodies, concurrency, duration_s, timeout_s))
  rows = summarise(out["records"], out["wall_s"])
  errors = [r["error"] for r in out["records"] if r["error"]]
  return {"rows": rows, "wall_s": out["wall_s"], "concurrency": concurrency,
          "first_errors": errors[:5]}


def raw_throughput(artifact: str, bodies: Sequence[Dict[str, Any]],
                   min_seconds: float = 5.0) -> Dict[str, float]:
  """Requests/s of the artifact's compiled functions on full batches of the largest bucket
  (tokens prepared beforehand) and of the engine (prompt + tokenise + function), for the
  same seeded request mix the clients send, each timed over at least `min_seconds`."""
  from gensar_jax.serving.app import Event, Query  # pylint: disable=g-import-not-at-top
  from gensar_jax.serving.engine import ServingEngine  # pylint: disable=g-import-not-at-top
  engine = ServingEngine(artifact)
  engine.warm_up()
  batch = max(engine.buckets)
  by_task: Dict[str, List[Any]] = {"search": [], "recommend": []}
  for request in bodies:
    body = request["body"]
    events = tuple(Event(kind=e["kind"], item_id=e["item_id"], query=e.get("query", ""))
                   for e in body["history"])
    by_task[request["endpoint"]].append(Query(history=events, k=body["k"],
                                              query=body.get("query")))
  for task, queries in by_task.items():
    if queries and len(queries) < batch:
      raise SystemExit(f"--raw needs at least {batch} {task} requests (--requests)")
  tokens = {task: np.stack([engine.encode(engine.prompt(task, q)) for q in queries])
            for task, queries in by_task.items() if queries}    # [n, input_length] each

  def timed(run_batch) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
      for task, task_tokens in tokens.items():
        for first in range(0, len(task_tokens) - batch + 1, batch):
          run_batch(task, first)
          done += batch
    return done / (time.perf_counter() - start)

  compiled = timed(lambda task, first: engine.run_tokens(task, tokens[task][first:first + batch]))
  ranked = timed(lambda task, first: (engine.search if task == "search" else engine.recommend)(
      by_task[task][first:first + batch]))
  return {"batch": batch, "compiled_requests_per_s": compiled,
          "engine_requests_per_s": ranked}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--artifact", required=True,
                      help="the served artifact (its items make the request bodies)")
  parser.add_argument("--url", default=None, help="a running server; default: start one")
  parser.add_argument("--requests", type=int, default=500, help="most requests to send")
  parser.add_argument("--duration_s", type=float, default=60.0, help="most seconds to send")
  parser.add_argument("--concurrency", default="16",
                      help="concurrent clients; a comma list (16,64,256) runs each level")
  parser.add_argument("--search_fraction", type=float, default=0.5)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_batch", type=int, default=None, help="server --max_batch")
  parser.add_argument("--max_wait_ms", type=float, default=5.0, help="server --max_wait_ms")
  parser.add_argument("--max_queue", type=int, default=None, help="server --max_queue")
  parser.add_argument("--startup_timeout_s", type=float, default=600.0)
  parser.add_argument("--json", action="store_true", help="also print the numbers as JSON")
  parser.add_argument("--raw", action="store_true",
                      help="also time the compiled functions in-process (no HTTP)")
  parser.add_argument("--raw_seconds", type=float, default=5.0,
                      help="least seconds each in-process measurement runs")
  args = parser.parse_args(argv)
  try:
    args.levels = [int(c) for c in str(args.concurrency).split(",")]
  except ValueError:
    parser.error(f"--concurrency={args.concurrency}: expected integers like 16,64,256")
  if min(args.levels) < 1:
    parser.error("--concurrency must be >= 1")
  for name in ("requests", "k"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1")
  if args.duration_s <= 0 or not 0.0 <= args.search_fraction <= 1.0:
    parser.error("--duration_s must be > 0 and --search_fraction in [0, 1]")
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  items = read_items(args.artifact)
  server, url = None, args.url
  log_path = None
  if url is None:
    fd, log_path = tempfile.mkstemp(prefix="gensar_load_test_server_", suffix=".log")
    os.close(fd)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args.artifact, port, args.max_batch, args.max_wait_ms, log_path,
                          args.max_queue)
  results = []
  try:
    wait_ready(url, server, args.startup_timeout_s)
    for level in args.levels:
      results.append(run_load_test(url, items, args.requests, level, args.duration_s,
                                   args.search_fraction, args.k, args.seed))
    alive = server is None or server.poll() is None
    healthy = httpx.get(f"{url}/healthz", timeout=5.0).status_code == 200 if alive else False
  finally:
    if server is not None:
      stop_server(server)
  for result in results:
    result["server_alive_after"] = bool(alive and healthy)
    print(format_table(result["rows"], result["concurrency"], result["wall_s"]))
    for error in result["first_errors"]:
      print(f"error: {error}")
  if len(results) > 1:
    print(format_levels(results))
  raw = None
  if args.raw:
    raw = raw_throughput(args.artifact, make_bodies(items, args.requests, args.search_fraction,
                                                    args.k, args.seed), args.raw_seconds)
    best = max(r["rows"]["all"]["requests_per_s"] for r in results)
    print(f"\nin-process, batches of {raw['batch']}: compiled function "
          f"{raw['compiled_requests_per_s']:.1f} req/s, engine (prompt + tokenise + function) "
          f"{raw['engine_requests_per_s']:.1f} req/s; server best {best:.1f} req/s = "
          f"{best / raw['compiled_requests_per_s']:.2f}x the compiled function")
  if args.json:
    out: Dict[str, Any] = results[0] if len(results) == 1 else {"levels": results}
    print(json.dumps({**out, "raw": raw} if raw else out))
  failed = (any(r["rows"]["all"]["errors"] > 0 for r in results)
            or not results[-1]["server_alive_after"])
  if log_path and not failed:
    os.remove(log_path)
  elif log_path:
    print(f"server log: {log_path}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
