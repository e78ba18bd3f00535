"""The search-and-recommend HTTP API (FastAPI on uvicorn).

  POST /search     {"history": [...], "query": "...", "k": 10} -> {"items": [...]}
  POST /recommend  {"history": [...], "k": 10}                 -> {"items": [...]}
  GET  /healthz    the process is up
  GET  /readyz     the engine is loaded and warmed up (503 until then)

A history event is {"kind": "rec", "item_id": "..."} or {"kind": "search", "item_id": "...",
"query": "..."}, oldest first; only the last `engine.max_history` events of each kind are
used, as in training. Every rejection is a 4xx with {"error": "<what and where>"}; a bad
request never reaches the device and never takes the server down.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Literal, Optional, Protocol, Sequence

import fastapi
import pydantic
from fastapi import responses

from gensar_jax.serving.batcher import Batcher

MAX_BODY_BYTES = 1 << 20     # 1 MiB: a 50-event history is a few kB
MAX_QUERY_CHARS = 512
MAX_HISTORY_EVENTS = 1000


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
  k: int = 10


class SearchRequest(RecommendRequest):
  query: str


class BadRequest(Exception):
  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


def _validate(engine: Engine, request: RecommendRequest, query: Optional[str]) -> Query:
  if not 1 <= request.k <= engine.max_k:
    raise BadRequest(422, f"k must be between 1 and {engine.max_k} (the beam size); got "
                          f"{request.k}")
  events = []
  for i, e in enumerate(request.history):
    if e.kind == "search" and not (e.query or "").strip():
      raise BadRequest(422, f"history[{i}]: a search event needs a non-empty 'query'")
    if e.query is not None and len(e.query) > MAX_QUERY_CHARS:
      raise BadRequest(422, f"history[{i}].query is longer than {MAX_QUERY_CHARS} "
                            "characters")
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
  return Query(history=tuple(events), k=request.k, query=query)


def _error(status: int, message: str) -> responses.JSONResponse:
  return responses.JSONResponse(status_code=status, content={"error": message})


def _hits_json(hits: Sequence[Hit]) -> Dict[str, Any]:
  return {"items": [{"item_id": h.item_id, "title": h.title, "score": h.score}
                    for h in hits]}


def create_app(engine: Engine, max_wait_ms: float = 5.0) -> fastapi.FastAPI:
  """The ASGI app around one engine; batching starts with the app and warms it up."""
  batchers = {
      "search": Batcher(engine.search, engine.max_batch_size, max_wait_ms),
      "recommend": Batcher(engine.recommend, engine.max_batch_size, max_wait_ms),
  }
  state = {"ready": False}

  async def lifespan(app):
    for b in batchers.values():
      b.start()
    engine.warm_up()
    state["ready"] = True
    yield
    state["ready"] = False
    for b in batchers.values():
      await b.stop()

  app = fastapi.FastAPI(title="gensar-jax", lifespan=lifespan)

  @app.middleware("http")
  async def limit_body(request: fastapi.Request, call_next):
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
      return _error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    return await call_next(request)

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def validation_error(request, exc):
    parts = []
    for err in exc.errors()[:5]:
      where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
      parts.append(f"{where}: {err.get('msg')}")
    return _error(422, "; ".join(parts) or "invalid request")

  async def answer(kind: str, request: RecommendRequest, query: Optional[str]):
    if not state["ready"]:
      return _error(503, "the model is still loading")
    try:
      validated = _validate(engine, request, query)
    except BadRequest as e:
      return _error(e.status, e.message)
    hits = await batchers[kind].submit(validated)
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

  @app.get("/readyz")
  async def readyz():
    if not state["ready"]:
      return _error(503, "not ready")
    return {"status": "ready", "batches": {k: b.batches_run for k, b in batchers.items()}}

  return app
