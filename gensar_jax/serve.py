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

The port is checked before the model loads (a port in use is an error at once, not after
minutes of loading); a corrupt artifact, or one whose metadata disagrees with its compiled
functions, is a one-line error. Both exit with code 2. On SIGTERM the server stops
accepting connections, answers the requests it has (up to --drain_s), answers a request
that arrives meanwhile on an open keep-alive connection with 503 and `Connection: close`,
then exits with code 0. With --api_key_file (or GENSAR_API_KEY in the environment) every
route but /healthz and /readyz needs `Authorization: Bearer <key>`; an empty key is an
error (exit 2), never auth silently off.

Connections (gensar_jax/serving/protocol.py): a request must arrive whole within
--read_timeout_s of its first byte, or it gets 408 and the connection is closed (a client
dribbling its body cannot hold a connection for good); beyond --max_connections open
connections a new one gets 503 with Retry-After and is closed; an idle keep-alive
connection is closed after --keep_alive_s.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from typing import Optional, Sequence

from gensar_jax.serving.protocol import (DEFAULT_KEEP_ALIVE_S, DEFAULT_MAX_CONNECTIONS,
                                         DEFAULT_READ_TIMEOUT_S)

API_KEY_ENV = "GENSAR_API_KEY"


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
  parser.add_argument("--max_queue", type=int, default=256,
                      help="most requests waiting per endpoint; beyond it 503 + Retry-After")
  parser.add_argument("--request_timeout_s", type=float, default=10.0,
                      help="a request not answered within this gets 504")
  parser.add_argument("--drain_s", type=float, default=30.0,
                      help="on SIGTERM, how long in-flight requests may take to finish")
  parser.add_argument("--read_timeout_s", type=float, default=DEFAULT_READ_TIMEOUT_S,
                      help="a request (headers and body) not received whole within this "
                           "of its first byte gets 408 and its connection is closed")
  parser.add_argument("--max_connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                      help="most open connections; a new one beyond gets 503 and is closed")
  parser.add_argument("--keep_alive_s", type=int, default=DEFAULT_KEEP_ALIVE_S,
                      help="an idle keep-alive connection is closed after this")
  parser.add_argument("--api_key_file", default=None,
                      help=f"require this bearer key (first line of the file; or set "
                           f"{API_KEY_ENV})")
  parser.add_argument("--log_level", default="info")
  args = parser.parse_args(argv)
  if args.max_queue < 1:
    parser.error(f"--max_queue must be >= 1, got {args.max_queue}")
  if args.request_timeout_s <= 0:
    parser.error(f"--request_timeout_s must be > 0, got {args.request_timeout_s}")
  if args.max_batch is not None and args.max_batch < 1:
    parser.error(f"--max_batch must be >= 1, got {args.max_batch}")
  if args.max_wait_ms < 0:
    parser.error(f"--max_wait_ms must be >= 0, got {args.max_wait_ms}")
  if args.read_timeout_s <= 0:
    parser.error(f"--read_timeout_s must be > 0, got {args.read_timeout_s}")
  if args.max_connections < 1:
    parser.error(f"--max_connections must be >= 1, got {args.max_connections}")
  if args.keep_alive_s < 1:
    parser.error(f"--keep_alive_s must be >= 1, got {args.keep_alive_s}")
  return args


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2)


def read_api_key(path: Optional[str]) -> Optional[str]:
  """The bearer key: the first line of `path`, else $GENSAR_API_KEY, else None (no auth).

  A key that is given but blank (an empty file, `GENSAR_API_KEY=` from a template or a
  secret that did not mount) is refused: treating it as "no key" would serve every route
  without auth while the operator believes it is protected.
  """
  if path:
    try:
      with open(path, encoding="utf-8") as f:
        key = f.readline().strip()
    except OSError as e:
      _fail(f"--api_key_file={path}: {e.strerror}")
    if not key:
      _fail(f"--api_key_file={path}: the first line is empty")
    return key
  if API_KEY_ENV not in os.environ:
    return None
  key = os.environ[API_KEY_ENV].strip()
  if not key:
    _fail(f"{API_KEY_ENV} is set but empty; set a key, or unset it to serve without auth")
  return key


def check_port(host: str, port: int) -> None:
  """Fails at once when the address cannot be bound (in use, or not this machine's)."""
  with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind((host, port))
    except OSError as e:
      _fail(f"cannot listen on {host}:{port}: {e.strerror} (another server there? pass "
            "--port)")


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = parse_args(argv)
  logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  api_key = read_api_key(args.api_key_file)
  check_port(args.host, args.port)
  from gensar_jax.serving import protocol
  from gensar_jax.serving.app import create_app
  from gensar_jax.serving.artifact import ArtifactError
  from gensar_jax.serving.engine import ServingEngine
  try:
    engine = ServingEngine(args.artifact, max_batch_size=args.max_batch)
  except (ArtifactError, FileNotFoundError) as e:
    _fail(str(e))
  app = create_app(engine, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                   request_timeout_s=args.request_timeout_s, api_key=api_key)
  server = protocol.server(app, args.host, args.port, read_timeout_s=args.read_timeout_s,
                           max_connections=args.max_connections, drain_s=args.drain_s,
                           keep_alive_s=args.keep_alive_s, log_level=args.log_level)

  def stop(signum, frame):  # pylint: disable=unused-argument
    server.should_exit = True

  # uvicorn handles SIGTERM while it serves (the drain), then restores the handler it found
  # and raises the signal again; the default handler would end a cleanly drained server
  # with status 143. This one makes that exit 0, and stops a server still starting up.
  signal.signal(signal.SIGTERM, stop)
  server.run()


if __name__ == "__main__":
  main()
