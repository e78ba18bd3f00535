"""The HTTP connection layer under the app: uvicorn's h11 protocol with the limits a server
facing real clients needs, and every answer it gives itself in the app's one error shape.

uvicorn answers some requests before the app sees them, and has no knob for others:

- a request it cannot parse (`Content-Length: abc`, a 40-digit length, a broken request
  line) gets uvicorn's plain-text 400; here it gets {"error": "..."} like every other error;
- a client may take forever to send its headers or body (one byte a second keeps the
  connection open for good: uvicorn has no read timeout). Here a request must arrive whole
  within `read_timeout_s` of its first byte (of the connection opening, for the first
  request); otherwise 408 and the connection is closed;
- uvicorn accepts every connection (its `limit_concurrency` answers 503 only once a
  request arrives, so idle or dribbling connections still pile up). Here a connection
  beyond `max_connections` open ones gets 503 with Retry-After at once and is closed;
- on shutdown uvicorn closes idle keep-alive connections at once, so a request a client
  has just sent on one is lost (a read error). Here an idle connection stays open for its
  keep-alive time, and a request on any connection during the drain gets 503 with
  `Connection: close`, so the client knows to go elsewhere.

Every one of these answers is counted in /metrics (endpoint "http" when no route was
read). The h11 implementation is named explicitly rather than uvicorn's "auto" (which
prefers httptools when installed), so these rules hold whatever else is installed.
"""
from __future__ import annotations

import asyncio
import json
from typing import Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gensar_jax.serving.metrics import ServerMetrics

DEFAULT_READ_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_KEEP_ALIVE_S = 5
RETRY_AFTER_S = 1
PROTOCOL_ENDPOINT = "http"   # the metrics label of answers given before a route is known

_REASONS = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}


def error_response(status: int, message: str, retry_after: bool = False) -> bytes:
  """A complete HTTP/1.1 response with the app's error body, closing the connection."""
  body = json.dumps({"error": message}).encode()
  headers = [f"HTTP/1.1 {status} {_REASONS[status]}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close"]
  if retry_after:
    headers.append(f"retry-after: {RETRY_AFTER_S}")
  return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


class LimitedH11Protocol(H11Protocol):
  """H11Protocol with a read deadline, a connection cap, JSON protocol errors and a drain
  that answers 503 instead of dropping connections. Configured by `protocol_class`."""

  metrics: Optional[ServerMetrics] = None
  read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
  max_connections: int = DEFAULT_MAX_CONNECTIONS

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._read_deadline: Optional[asyncio.TimerHandle] = None
    self._protocol_error: Optional[str] = None
    parse = self.conn.next_event

    def next_event():
      try:
        return parse()
      except h11.RemoteProtocolError as e:
        self._protocol_error = str(e)
        raise

    self.conn.next_event = next_event   # one h11.Connection per TCP connection

  def _count(self, status: int) -> None:
    if self.metrics is not None:
      self.metrics.record(PROTOCOL_ENDPOINT, status, 0.0)

  def _refuse(self, status: int, message: str, retry_after: bool = False) -> None:
    """Answers before (or instead of) the app and closes the connection."""
    self._count(status)
    if self.cycle is not None and not self.cycle.response_complete:
      # The app may still be waiting for the body: it now reads a disconnect, and anything
      # it sends is dropped.
      self.cycle.disconnected = True
      self.cycle.message_event.set()
    if not self.transport.is_closing():
      self.transport.write(error_response(status, message, retry_after))
      self.transport.close()

  # ------------------------------------------------------------------ connection cap

  def connection_made(self, transport) -> None:  # type: ignore[override]
    super().connection_made(transport)
    if len(self.connections) > self.max_connections:
      self._refuse(503, f"the server has {self.max_connections} open connections, its "
                        f"limit; retry in {RETRY_AFTER_S} s", retry_after=True)
      return
    self._arm_read_deadline()

  def connection_lost(self, exc) -> None:
    self._disarm_read_deadline()
    super().connection_lost(exc)

  # ------------------------------------------------------------------ read deadline

  def _arm_read_deadline(self) -> None:
    if self._read_deadline is None:
      self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

  def _disarm_read_deadline(self) -> None:
    if self._read_deadline is not None:
      self._read_deadline.cancel()
      self._read_deadline = None

  def data_received(self, data: bytes) -> None:
    self._arm_read_deadline()   # a no-op while the current request's deadline runs
    super().data_received(data)

  def _still_reading(self) -> bool:
    cycle = self.cycle
    if cycle is None or cycle.response_complete:
      return True        # no request yet, or the next one's headers are still coming
    return cycle.more_body and not cycle.response_started

  def _read_timed_out(self) -> None:
    self._read_deadline = None
    if self.transport.is_closing() or not self._still_reading():
      return  # read in time; the app is answering (its own deadline is request_timeout_s)
    self._refuse(408, f"the request was not received within {self.read_timeout_s:g} s")

  def on_response_complete(self) -> None:
    self._disarm_read_deadline()  # the next request's deadline starts at its first byte
    super().on_response_complete()

  # ------------------------------------------------------------------ protocol errors

  def send_400_response(self, msg: str) -> None:
    # h11's own words (e.g. "bad Content-Length"), which uvicorn's `msg` leaves out.
    self._refuse(400, f"invalid HTTP request: {self._protocol_error or msg}")

  # ------------------------------------------------------------------ drain

  def shutdown(self) -> None:
    """Graceful shutdown of this connection (uvicorn calls it on SIGTERM).

    A request in flight is answered, with `Connection: close`. An idle keep-alive
    connection is left open until its keep-alive time runs out rather than closed under a
    client that may be sending on it; any request that arrives meanwhile gets 503 with
    `Connection: close`.
    """
    self.app = self._draining_app
    if self.cycle is None or self.cycle.response_complete:
      if self.timeout_keep_alive_task is None:
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler)
    else:
      self.cycle.keep_alive = False

  async def _draining_app(self, scope, receive, send) -> None:
    body = json.dumps({"error": "the server is shutting down; retry on another replica"}
                      ).encode()
    self._count(503)
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                            (b"retry-after", str(RETRY_AFTER_S).encode())]})
    await send({"type": "http.response.body", "body": body})


def protocol_class(metrics: Optional[ServerMetrics] = None,
                   read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                   max_connections: int = DEFAULT_MAX_CONNECTIONS) -> type:
  """A LimitedH11Protocol subclass bound to one server's metrics and limits (uvicorn
  instantiates the protocol class per connection, so settings travel on the class)."""
  if read_timeout_s <= 0:
    raise ValueError(f"read_timeout_s must be > 0, got {read_timeout_s}")
  if max_connections < 1:
    raise ValueError(f"max_connections must be >= 1, got {max_connections}")
  return type("BoundLimitedH11Protocol", (LimitedH11Protocol,),
              {"metrics": metrics, "read_timeout_s": float(read_timeout_s),
               "max_connections": int(max_connections)})


def server(app, host: str, port: int, *, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
           max_connections: int = DEFAULT_MAX_CONNECTIONS, drain_s: float = 30.0,
           keep_alive_s: int = DEFAULT_KEEP_ALIVE_S, log_level: str = "info"
           ) -> uvicorn.Server:
  """The uvicorn server for an app of create_app, with the limits of this module (the
  serve CLI and the tests build it here, so both run the same connection rules)."""
  metrics = getattr(getattr(app, "state", None), "metrics", None)
  config = uvicorn.Config(app, host=host, port=port, log_level=log_level, workers=1,
                          http=protocol_class(metrics, read_timeout_s, max_connections),
                          timeout_keep_alive=keep_alive_s,
                          timeout_graceful_shutdown=drain_s)
  return uvicorn.Server(config)
