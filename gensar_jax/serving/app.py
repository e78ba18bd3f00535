"""The search-and-recommend HTTP API (FastAPI on uvicorn).

  POST /search     {"history": [...], "query": "...", "k": 10} -> {"items": [...]}
  POST /recommend  {"history": [...], "k": 10}                 -> {"items": [...]}
  GET  /healthz    the process is up
  GET  /readyz     the engine is loaded and warmed up (503 until then)
  GET  /metrics    Prometheus metrics (gensar_jax/serving/metrics.py)

A history event is {"kind": "rec", "item_id": "..."} or {"kind": "search", "item_id": "...",
"query": "..."}, oldest first; only the last `engine.max_history` events of each kind are
used, as in training. Every error, from validation, routing or the server, has one shape:
{"error": "<what and where>"}; a bad request never reaches the device and never takes the
server down.

The two POST routes read their body as JSON whatever its Content-Type says: `curl -d` sends
`application/x-www-form-urlencoded` unless told otherwise, and a JSON API has no other body
to read. /metrics counts every response, the framework's and the connection layer's
(gensar_jax/serving/protocol.py) included.

Facing real traffic: at most `max_queue` requests wait per endpoint, beyond that a request
gets 503 with `Retry-After` at once (so admitted requests keep a bounded latency instead of
every request slowing down with load); a request that has not been answered within
`request_timeout_s` gets 504. With an `api_key`, every route except /healthz and /readyz
(the orchestrator's probes), including /docs, /openapi.json and /metrics, needs the header
`Authorization: Bearer <key>`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from typing import Any, Dict, List, Literal, Optional, Protocol, Sequence

import fastapi
import pydantic
import starlette.exceptions
from fastapi import responses

from gensar_jax.serving.batcher import Batcher, QueueFull
from gensar_jax.serving.metrics import ServerMetrics

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20     # 1 MiB: a 50-event history is a few kB
MAX_QUERY_CHARS = 512
MAX_HISTORY_EVENTS = 1000
DEFAULT_K = 10
DEFAULT_MAX_QUEUE = 256          # per endpoint
DEFAULT_REQUEST_TIMEOUT_S = 10.0
RETRY_AFTER_S = 1
PUBLIC_PATHS = ("/healthz", "/readyz")


@dataclasses.dataclass(frozen=True)
class Event:
  kind: str       # "rec" | "search"
  item_id: str
  query: str = ""


@dataclasses.dataclass(frozen=True)
class Query:
  """One validated request: recommend when `query` is None, search otherwise."""
  history: Sequence[Event]
  k: int
  query: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Hit:
  item_id: str
  title: str
  score: float


class Engine(Protocol):
  """What the server needs from a loaded artifact (gensar_jax/serving/engine.py)."""
  max_batch_size: int
  max_k: int

  def unknown_items(self, item_ids: Sequence[str]) -> List[str]: ...
  def search(self, queries: Sequence[Query]) -> List[List[Hit]]: ...
  def recommend(self, queries: Sequence[Query]) -> List[List[Hit]]: ...
  def warm_up(self) -> None: ...


class EventModel(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid", strict=True)
  kind: Literal["rec", "search"]
  item_id: str
  query: Optional[str] = None


class RecommendRequest(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid", strict=True)
  history: List[EventModel] = pydantic.Field(default_factory=list,
                                             max_length=MAX_HISTORY_EVENTS)
  k: Optional[int] = None   # default: min(DEFAULT_K, the artifact's beam count)


class SearchRequest(RecommendRequest):
  query: str


def _check_text(text: str, where: str) -> None:
  """Text the tokenizer can take: a lone surrogate ("\\ud800", legal in JSON) is not UTF-8
  and would fail the whole batch it was tokenised in."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise BadRequest(422, f"{where} is not valid Unicode text (a lone surrogate at "
                          f"character {e.start})") from None


class BadRequest(Exception):
  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


def _validate(engine: Engine, request: RecommendRequest, query: Optional[str]) -> Query:
  k = min(DEFAULT_K, engine.max_k) if request.k is None else request.k
  if not 1 <= k <= engine.max_k:
    raise BadRequest(422, f"k must be between 1 and {engine.max_k} (the beam size); got {k}")
  events = []
  for i, e in enumerate(request.history):
    if e.kind == "search" and not (e.query or "").strip():
      raise BadRequest(422, f"history[{i}]: a search event needs a non-empty 'query'")
    if e.query is not None and len(e.query) > MAX_QUERY_CHARS:
      raise BadRequest(422, f"history[{i}].query is longer than {MAX_QUERY_CHARS} "
                            "characters")
    _check_text(e.query or "", f"history[{i}].query")
    _check_text(e.item_id, f"history[{i}].item_id")
    events.append(Event(kind=e.kind, item_id=e.item_id, query=(e.query or "").strip()))
  unknown = engine.unknown_items([e.item_id for e in events])
  if unknown:
    shown = ", ".join(repr(u) for u in unknown[:5])
    raise BadRequest(422, f"history names {len(unknown)} unknown item id(s): {shown}")
  if query is not None:
    query = query.strip()
    if not query:
      raise BadRequest(422, "query must not be empty")
    if len(query) > MAX_QUERY_CHARS:
      raise BadRequest(422, f"query is longer than {MAX_QUERY_CHARS} characters "
                            f"({len(query)})")
    _check_text(query, "query")
  return Query(history=tuple(events), k=k, query=query)


def _error(status: int, message: str, headers: Optional[Dict[str, str]] = None
           ) -> responses.JSONResponse:
  return responses.JSONResponse(status_code=status, content={"error": message},
                                headers=headers)


class BearerAuth:
  """ASGI middleware: every path but the probes needs `Authorization: Bearer <api_key>`."""

  def __init__(self, app, api_key: str):
    self.app = app
    self.expected = f"Bearer {api_key}".encode()

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http" or scope.get("path") in PUBLIC_PATHS:
      return await self.app(scope, receive, send)
    given = dict(scope.get("headers") or []).get(b"authorization", b"")
    if hmac.compare_digest(given, self.expected):
      return await self.app(scope, receive, send)
    body = json.dumps({"error": "missing or wrong API key (send Authorization: Bearer "
                                "<key>)"}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})


def _hits_json(hits: Sequence[Hit]) -> Dict[str, Any]:
  return {"items": [{"item_id": h.item_id, "title": h.title, "score": h.score}
                    for h in hits]}


class BodyLimit:
  """ASGI middleware: refuses bodies over `max_bytes` before the app parses them.

  A declared Content-Length is checked up front; a chunked body is read up to the limit
  and then replayed to the app, so neither form can make the server buffer 10 MB of JSON.
  """

  def __init__(self, app, max_bytes: int):
    self.app = app
    self.max_bytes = max_bytes

  async def _refuse(self, send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = dict(scope.get("headers") or [])
    length = headers.get(b"content-length")
    too_large = f"request body larger than {self.max_bytes} bytes"
    if length is not None:
      if not length.isdigit():
        return await self._refuse(send, 400, "Content-Length is not a number")
      if int(length) > self.max_bytes:
        return await self._refuse(send, 413, too_large)
      return await self.app(scope, receive, send)
    if scope.get("method") in ("GET", "HEAD"):
      return await self.app(scope, receive, send)
    chunks, size = [], 0
    while True:
      message = await receive()
      if message["type"] == "http.disconnect":
        return
      chunk = message.get("body", b"")
      size += len(chunk)
      if size > self.max_bytes:
        return await self._refuse(send, 413, too_large)
      chunks.append(chunk)
      if not message.get("more_body", False):
        break
    replayed = False

    async def replay():
      nonlocal replayed
      if not replayed:
        replayed = True
        return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
      return await receive()

    return await self.app(scope, replay, send)


JSON_ROUTES = ("/search", "/recommend")
# The metrics label of each route; any other path (404s from scanners) is "other", so a
# scan cannot grow /metrics without bound.
ENDPOINTS = {"/search": "search", "/recommend": "recommend", "/healthz": "healthz",
             "/readyz": "readyz", "/metrics": "metrics", "/docs": "docs",
             "/openapi.json": "openapi"}


class JSONBody:
  """ASGI middleware: the POST routes' body is JSON, whatever Content-Type the client sent.

  curl's `-d` sends `application/x-www-form-urlencoded`; FastAPI would then read the JSON
  text as a form and answer 422. The routes take nothing but JSON, so the header is set to
  what the body must be; a body that is not JSON still gets 422 "JSON decode error".
  """

  def __init__(self, app):
    self.app = app

  async def __call__(self, scope, receive, send):
    if (scope["type"] == "http" and scope.get("method") == "POST"
        and scope.get("path") in JSON_ROUTES):
      headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
      scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
    return await self.app(scope, receive, send)


class CountResponses:
  """ASGI middleware, outermost: counts every response by endpoint and status in /metrics,
  whoever gave it (a route, validation's 422, routing's 404/405, BodyLimit's 413,
  BearerAuth's 401), and times it."""

  def __init__(self, app, metrics: ServerMetrics):
    self.app = app
    self.metrics = metrics

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    endpoint = ENDPOINTS.get(scope.get("path"), "other")
    start = time.perf_counter()
    counted = False

    async def counting_send(message):
      nonlocal counted
      if message["type"] == "http.response.start" and not counted:
        counted = True
        self.metrics.record(endpoint, int(message["status"]), time.perf_counter() - start)
      await send(message)

    try:
      await self.app(scope, receive, counting_send)
    except BaseException:
      if not counted:  # the server answers 500 for an app that raised before answering
        self.metrics.record(endpoint, 500, time.perf_counter() - start)
      raise


def create_app(engine: Engine, max_wait_ms: float = 5.0,
               max_body_bytes: int = MAX_BODY_BYTES, max_queue: int = DEFAULT_MAX_QUEUE,
               request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
               api_key: Optional[str] = None) -> fastapi.FastAPI:
  """The ASGI app around one engine.

  Batching starts with the app; the engine warms up (compiles) in a worker thread, so
  /healthz answers at once and /readyz (and every query) says 503 until it is done. One
  executor thread serves both endpoints' batches: device calls never interleave.
  """
  executor = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                   thread_name_prefix="engine")
  batchers = {
      "search": Batcher(engine.search, engine.max_batch_size, max_wait_ms, executor,
                        max_queue=max_queue),
      "recommend": Batcher(engine.recommend, engine.max_batch_size, max_wait_ms, executor,
                           max_queue=max_queue),
  }
  metrics = ServerMetrics(batchers)
  state: Dict[str, Any] = {"ready": False, "warm_up_error": None}

  def warm_up():
    try:
      engine.warm_up()
      state["ready"] = True
    except Exception as e:  # pylint: disable=broad-except
      state["warm_up_error"] = f"{type(e).__name__}: {e}"
      logger.exception("engine warm-up failed")

  @contextlib.asynccontextmanager
  async def lifespan(app):
    for b in batchers.values():
      b.start()
    warming = asyncio.get_running_loop().run_in_executor(executor, warm_up)
    yield
    state["ready"] = False
    for b in batchers.values():
      await b.stop()
    await warming
    executor.shutdown(wait=False)

  app = fastapi.FastAPI(title="gensar-jax", lifespan=lifespan)
  app.state.metrics = metrics   # the connection layer counts its own answers here too
  app.add_middleware(JSONBody)
  app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
  if api_key:
    app.add_middleware(BearerAuth, api_key=api_key)
  app.add_middleware(CountResponses, metrics=metrics)  # added last: runs first

  @app.exception_handler(starlette.exceptions.HTTPException)
  async def http_error(request, exc):  # 404, 405 ...: the same shape as every other error
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def validation_error(request, exc):
    parts = []
    for err in exc.errors()[:5]:
      where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
      parts.append(f"{where}: {err.get('msg')}")
    return _error(422, "; ".join(parts) or "invalid request")

  async def answer(kind: str, request: RecommendRequest, query: Optional[str]):
    if not state["ready"]:
      why = state["warm_up_error"] or "the model is still loading"
      return _error(503, why)
    try:
      validated = _validate(engine, request, query)
    except BadRequest as e:
      return _error(e.status, e.message)
    try:
      hits = await asyncio.wait_for(batchers[kind].submit(validated), request_timeout_s)
    except QueueFull:
      return _error(503, f"{kind}: the server is at capacity; retry in {RETRY_AFTER_S} s",
                    {"Retry-After": str(RETRY_AFTER_S)})
    except asyncio.TimeoutError:
      return _error(504, f"{kind}: no answer within {request_timeout_s:g} s")
    except Exception:  # pylint: disable=broad-except
      # The exception text can hold internals (paths, shapes): the log gets it, not the client.
      logger.exception("%s request failed", kind)
      return _error(500, f"{kind} failed (an internal error; see the server log)")
    return _hits_json(hits[:validated.k])

  @app.post("/search")
  async def search(request: SearchRequest):
    return await answer("search", request, request.query)

  @app.post("/recommend")
  async def recommend(request: RecommendRequest):
    return await answer("recommend", request, None)

  @app.get("/healthz")
  async def healthz():
    return {"status": "ok"}

  @app.get("/metrics")
  async def prometheus_metrics():
    return responses.PlainTextResponse(metrics.render(batchers),
                                       media_type="text/plain; version=0.0.4")

  @app.get("/readyz")
  async def readyz():
    if not state["ready"]:
      return _error(503, state["warm_up_error"] or "not ready")
    return {"status": "ready", "max_k": engine.max_k, "max_batch_size": engine.max_batch_size,
            "batches": {k: b.batches_run for k, b in batchers.items()},
            "requests": {k: b.requests_run for k, b in batchers.items()}}

  return app
