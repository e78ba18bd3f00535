"""Serve an exported artifact over HTTP (gensar_jax/serving/app.py on uvicorn).

  python -m gensar_jax.serve --artifact=runs/tiny/export --port=8000

  curl -s localhost:8000/readyz
  curl -s -X POST localhost:8000/recommend -H 'content-type: application/json' \
      -d '{"history": [{"kind": "rec", "item_id": "50"}], "k": 5}'
  curl -s -X POST localhost:8000/search -H 'content-type: application/json' \
      -d '{"history": [], "query": "sci-fi comedy", "k": 5}'

No gin flags: everything the server needs is in the artifact (python -m gensar_jax.export).
One process owns the accelerator, so there is one uvicorn worker; concurrency comes from
request batching, not from more processes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m gensar_jax.serve", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--artifact", required=True, help="directory written by gensar_jax.export")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--max_batch", type=int, default=None,
                      help="most requests per device call (default and cap: the artifact's "
                           "largest batch bucket)")
  parser.add_argument("--max_wait_ms", type=float, default=5.0,
                      help="how long a request may wait for others to fill its batch")
  parser.add_argument("--log_level", default="info")
  args = parser.parse_args(argv)
  if args.max_batch is not None and args.max_batch < 1:
    parser.error(f"--max_batch must be >= 1, got {args.max_batch}")
  if args.max_wait_ms < 0:
    parser.error(f"--max_wait_ms must be >= 0, got {args.max_wait_ms}")
  return args


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = parse_args(argv)
  logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  import uvicorn

  from gensar_jax.serving.app import create_app
  from gensar_jax.serving.artifact import ArtifactError
  from gensar_jax.serving.engine import ServingEngine
  try:
    engine = ServingEngine(args.artifact, max_batch_size=args.max_batch)
  except (ArtifactError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  app = create_app(engine, max_wait_ms=args.max_wait_ms)
  uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, workers=1)


if __name__ == "__main__":
  main()
