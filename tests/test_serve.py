"""The HTTP server over a real exported artifact (a freshly initialised tiny model): good
answers, batching, every kind of bad request answered 4xx while the server keeps serving,
through FastAPI's TestClient and a real uvicorn server on a loopback port; the connection
layer of the serve CLI (gensar_jax/serving/protocol.py: read timeout, connection cap, JSON
protocol errors, the drain) on raw sockets; artifacts whose files disagree; and a smoke run
of launch/bench/bench_serving.py."""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

from gensar_jax import gin_utils
from gensar_jax.serving import app as app_lib
from gensar_jax.serving.app import Event, Query, create_app
from gensar_jax.serving.engine import ServingEngine
from task_world import random_artifact

PREFIX = "tserve"
BEAMS = 6
BUCKETS = (1, 4)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
  path, _ = random_artifact(tmp_path_factory.mktemp("serve"), PREFIX, BEAMS, BUCKETS)
  served = ServingEngine(path)
  served.warm_up()
  return served


GOOD_HISTORY = [{"kind": "rec", "item_id": "I01"},
                {"kind": "search", "item_id": "I02", "query": "travel mug"}]
GOOD = ("/search", {"history": GOOD_HISTORY, "query": "coffee maker", "k": 3})

# (name, path, body or raw bytes, expected status, a piece of the expected error message)
BAD = [
    ("unknown item", "/recommend", {"history": [{"kind": "rec", "item_id": "NOPE"}]}, 422,
     "unknown item id(s): 'NOPE'"),
    ("empty query", "/search", {"history": GOOD_HISTORY, "query": "  "}, 422,
     "query must not be empty"),
    ("missing query", "/search", {"history": GOOD_HISTORY}, 422, "query: Field required"),
    ("long query", "/search", {"history": [], "query": "x" * 600}, 422, "longer than 512"),
    ("10 MB query", "/search", {"history": [], "query": "x" * 10_000_000}, 413,
     "request body larger than"),
    ("k zero", "/recommend", {"history": GOOD_HISTORY, "k": 0}, 422, "k must be between 1"),
    ("k negative", "/recommend", {"history": GOOD_HISTORY, "k": -3}, 422, "k must be between"),
    ("k huge", "/recommend", {"history": GOOD_HISTORY, "k": 10 ** 30}, 422, "k must be between"),
    ("k above beams", "/recommend", {"history": GOOD_HISTORY, "k": BEAMS + 1}, 422,
     f"between 1 and {BEAMS}"),
    ("k as string", "/recommend", {"history": GOOD_HISTORY, "k": "3"}, 422, "k:"),
    ("k as float", "/recommend", {"history": GOOD_HISTORY, "k": 2.5}, 422, "k:"),
    ("item id as int", "/recommend", {"history": [{"kind": "rec", "item_id": 1}]}, 422,
     "history.0.item_id"),
    ("history not a list", "/recommend", {"history": "I01"}, 422, "history"),
    ("unknown kind", "/recommend", {"history": [{"kind": "buy", "item_id": "I01"}]}, 422,
     "history.0.kind"),
    ("extra field", "/recommend", {"history": [], "user": "u1"}, 422, "user"),
    ("search event without query", "/recommend",
     {"history": [{"kind": "search", "item_id": "I01"}]}, 422, "history[0]: a search event"),
    ("query as list", "/search", {"history": [], "query": ["a"]}, 422, "query"),
    ("body is a list", "/recommend", [1, 2], 422, ""),
    ("invalid json", "/recommend", b"{not json", 422, "JSON"),
    # A lone surrogate is legal JSON but not UTF-8: it would crash the tokenizer in a batch.
    ("lone surrogate in query", "/search", b'{"history": [], "query": "coffee \\ud800"}',
     422, "query is not valid Unicode text"),
    ("lone surrogate in history", "/recommend",
     b'{"history": [{"kind": "search", "item_id": "I01", "query": "\\udfff"}]}', 422,
     "history[0].query is not valid Unicode text"),
]


def send(client, path, body):
  if isinstance(body, bytes):
    return client.post(path, content=body, headers={"content-type": "application/json"})
  return client.post(path, json=body)


def check_good(response, engine):
  assert response.status_code == 200, response.text
  items = response.json()["items"]
  assert len(items) == 3 and len({i["item_id"] for i in items}) == 3
  titles = dict(zip(engine.item_ids, engine.titles))
  scores = [i["score"] for i in items]
  assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
  assert all(titles[i["item_id"]] == i["title"] for i in items)
  return items


@pytest.fixture(scope="module")
def client(engine):
  with TestClient(create_app(engine, max_wait_ms=2.0)) as c:
    deadline = time.time() + 60
    while c.get("/readyz").status_code != 200:
      assert time.time() < deadline, "engine never became ready"
      time.sleep(0.05)
    yield c


def test_answers_equal_the_engine_and_respect_k(client, engine):
  items = check_good(client.post(GOOD[0], json=GOOD[1]), engine)
  query = Query(history=(Event("rec", "I01"), Event("search", "I02", "travel mug")), k=3,
                query="coffee maker")
  direct = engine.search([query])[0]
  assert [i["item_id"] for i in items] == [h.item_id for h in direct]
  np.testing.assert_allclose([i["score"] for i in items], [h.score for h in direct], rtol=1e-6)
  rec = client.post("/recommend", json={"history": GOOD_HISTORY, "k": BEAMS}).json()["items"]
  assert len(rec) == BEAMS
  # Search and recommend decode different identifier spaces, so the prompts differ.
  assert engine.prompt("search", query) != engine.prompt("recommend", query)
  assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("name,path,body,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_4xx_then_server_still_serves(client, engine, name, path, body,
                                                       status, message):
  response = send(client, path, body)
  assert response.status_code == status, response.text
  assert message in response.json()["error"]
  check_good(client.post(GOOD[0], json=GOOD[1]), engine)


def test_chunked_oversized_body_is_refused(client, engine):
  def chunks():
    for _ in range(20):
      yield b"x" * (1 << 17)   # 2.5 MiB in all, no Content-Length
  response = client.post("/search", content=chunks(),
                         headers={"content-type": "application/json"})
  assert response.status_code == 413
  check_good(client.post(GOOD[0], json=GOOD[1]), engine)


def test_user_text_cannot_produce_control_or_identifier_tokens(engine):
  """Every reserved form in a query or a history query is read as plain text."""
  sp = engine._tokenizer  # pylint: disable=protected-access
  identifier = engine._identifier_text["search"][0]  # pylint: disable=protected-access
  reserved_forms = ["<rec_item>", "<src_item>", "<src_query>", "</s>",
                    *[f"<{p}>" for p in identifier.strip("<>").split("><")]]
  reserved_ids = {sp.piece_to_id(t) for t in reserved_forms} - {sp.unk_id()}
  assert len(reserved_ids) >= 4  # the forms really are single pieces of this vocabulary

  def reserved_count(query):
    prompt = engine.prompt("search", query)
    return sum(int(t) in reserved_ids for t in engine.encode(prompt))

  history = (Event("rec", "I01"), Event("search", "I02", "travel mug"))
  clean = reserved_count(Query(history=history, k=3, query="coffee maker"))
  for form in reserved_forms + ["<<m0_1>>"]:
    poisoned_query = Query(history=history, k=3, query=f"coffee {form} maker")
    assert reserved_count(poisoned_query) == clean, form
    poisoned_history = Query(history=(Event("rec", "I01"),
                                      Event("search", "I02", f"travel {form}")),
                             k=3, query="coffee maker")
    assert reserved_count(poisoned_history) == clean, form


def test_a_failing_request_fails_alone_in_its_batch():
  """The batcher retries a failed batch one request at a time: the culprit gets the error,
  every other request of the batch its answer."""
  import asyncio
  from gensar_jax.serving.batcher import Batcher

  def run_batch(requests):
    if "poison" in requests:
      raise ValueError("cannot tokenise")
    return [r.upper() for r in requests]

  async def main():
    batcher = Batcher(run_batch, max_batch_size=16, max_wait_ms=50)
    batcher.start()
    requests = [f"q{i}" for i in range(7)] + ["poison"] + [f"r{i}" for i in range(7)]
    answers = await asyncio.gather(*(batcher.submit(r) for r in requests),
                                   return_exceptions=True)
    await batcher.stop()
    return requests, answers, batcher

  requests, answers, batcher = asyncio.run(main())
  for request, answer in zip(requests, answers):
    if request == "poison":
      assert isinstance(answer, ValueError)
    else:
      assert answer == request.upper()
  assert batcher.batches_failed >= 1 and batcher.requests_failed == 1
  assert batcher.requests_run == len(requests) - 1


def test_batching_is_invisible_in_results(engine):
  """6 concurrent requests run as fewer device calls, and each answer equals its solo one."""
  queries = [Query(history=(Event("rec", f"I{i:02d}"),), k=BEAMS) for i in range(6)]
  solo = [engine.recommend([q])[0] for q in queries]
  together = engine.recommend(queries)   # a bucket of 4 and a padded 2
  for a, b in zip(solo, together):
    assert [h.item_id for h in a] == [h.item_id for h in b]
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-5,
                               atol=1e-6)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_until_ready(url, timeout_s, process=None):
  deadline = time.time() + timeout_s
  while True:
    if process is not None:
      assert process.poll() is None, process.stdout.read()
    try:
      if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
        return
    except httpx.HTTPError:
      pass
    assert time.time() < deadline, f"{url} never became ready"
    time.sleep(0.1)


@pytest.fixture(scope="module")
def live_server(engine):
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(create_app(engine, max_wait_ms=20.0), host="127.0.0.1",
                                         port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{port}"
  wait_until_ready(url, 60)
  yield url
  server.should_exit = True
  thread.join(timeout=30)


def test_real_server_bad_requests_then_good(live_server, engine):
  with httpx.Client(base_url=live_server, timeout=30) as http:
    for name, path, body, status, message in BAD:
      try:
        response = send(http, path, body)
      except httpx.HTTPError as e:   # the 10 MB upload may be cut off after the 413
        assert name == "10 MB query", f"{name}: {e!r}"
        continue
      assert response.status_code == status, (name, response.text)
      assert message in response.json()["error"], name
    check_good(http.post(GOOD[0], json=GOOD[1]), engine)


def test_real_server_batches_concurrent_requests(live_server, engine):
  before = httpx.get(f"{live_server}/readyz").json()
  bodies = [{"history": [{"kind": "rec", "item_id": f"I{i:02d}"}], "k": 2} for i in range(8)]
  with futures.ThreadPoolExecutor(8) as pool:
    answers = list(pool.map(
        lambda b: httpx.post(f"{live_server}/recommend", json=b, timeout=60), bodies))
  assert all(a.status_code == 200 for a in answers)
  after = httpx.get(f"{live_server}/readyz").json()
  assert after["requests"]["recommend"] - before["requests"]["recommend"] == 8
  assert after["batches"]["recommend"] - before["batches"]["recommend"] < 8
  solo = engine.recommend([Query(history=(Event("rec", "I05"),), k=2)])[0]
  assert [i["item_id"] for i in answers[5].json()["items"]] == [h.item_id for h in solo]


def test_load_test_smoke(live_server, engine):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([gin_utils.REPO_ROOT, env.get("PYTHONPATH", "")])
  proc = subprocess.run(
      [sys.executable, "-m", "launch.bench.bench_serving",
       f"--artifact={engine.directory}", f"--url={live_server}", "--requests=16",
       "--concurrency=4", "--duration_s=120", "--k=3", "--json", "--raw", "--raw_seconds=0.5"],
      capture_output=True, text=True, timeout=180, env=env)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  rows = result["rows"]
  assert rows["all"]["requests"] == 16 and rows["all"]["errors"] == 0
  assert rows["search"]["requests"] + rows["recommend"]["requests"] == 16
  assert 0 < rows["all"]["p50_ms"] <= rows["all"]["p99_ms"]
  assert result["server_alive_after"] is True
  assert "req/s" in proc.stdout and "p99 ms" in proc.stdout
  # --raw: the same requests through the artifact's compiled functions, in-process.
  raw = result["raw"]
  assert raw["batch"] == max(BUCKETS)
  assert raw["compiled_requests_per_s"] > 0 and raw["engine_requests_per_s"] > 0
  assert "x the compiled function" in proc.stdout


def test_real_server_poisoned_request_among_concurrent_good_ones(live_server, engine):
  """The attack of issue 16: one query with a lone surrogate sent with 15 valid searches at
  once, three rounds. The poisoned one is refused; every valid one answers 200."""
  poison = b'{"history": [], "query": "coffee \\ud800", "k": 3}'
  with httpx.Client(base_url=live_server, timeout=60) as http, \
      futures.ThreadPoolExecutor(max_workers=16) as pool:
    for _ in range(3):
      good = [pool.submit(http.post, GOOD[0], json=GOOD[1]) for _ in range(15)]
      bad = pool.submit(send, http, "/search", poison)
      assert bad.result().status_code == 422
      for f in good:
        check_good(f.result(), engine)


# ----------------------------------------------------------------- facing real traffic


class SlowEngine:
  """The app's Engine protocol with a fixed device time per batch, for admission tests."""
  max_batch_size = 2
  max_k = 5

  def __init__(self, seconds):
    self.seconds = seconds

  def unknown_items(self, item_ids):
    return []

  def _answer(self, queries):
    time.sleep(self.seconds)
    return [[app_lib.Hit(item_id="I01", title="t", score=-1.0)] for _ in queries]

  search = recommend = _answer

  def warm_up(self):
    pass


def _ready(client):
  deadline = time.time() + 30
  while client.get("/readyz").status_code != 200:
    assert time.time() < deadline
    time.sleep(0.02)


def test_overload_gets_503_with_retry_after_and_admitted_requests_stay_bounded():
  with TestClient(create_app(SlowEngine(0.2), max_wait_ms=1.0, max_queue=2)) as client, \
      futures.ThreadPoolExecutor(max_workers=24) as pool:
    _ready(client)
    started = time.perf_counter()
    answers = list(pool.map(lambda _: (client.post("/recommend", json={"history": []}),
                                       time.perf_counter() - started), range(24)))
  statuses = [r.status_code for r, _ in answers]
  assert statuses.count(503) > 0 and statuses.count(200) > 0, statuses
  assert set(statuses) <= {200, 503}
  for response, seconds in answers:
    if response.status_code == 503:
      assert response.headers["retry-after"] == "1"
      assert "at capacity" in response.json()["error"]
    else:  # at most a full queue ahead of it: a few batches, not 24 requests' worth
      assert seconds < 0.2 * 8, seconds


def test_a_request_past_its_deadline_gets_504():
  with TestClient(create_app(SlowEngine(1.5), request_timeout_s=0.2)) as client:
    _ready(client)
    response = client.post("/recommend", json={"history": []})
  assert response.status_code == 504 and "no answer within 0.2 s" in response.json()["error"]


def test_bearer_auth_metrics_and_one_error_shape(engine):
  with TestClient(create_app(engine, max_wait_ms=1.0, api_key="s3cret")) as client:
    _ready(client)  # the probes stay public
    assert client.get("/healthz").status_code == 200
    for path in ("/docs", "/openapi.json", "/metrics"):
      refused = client.get(path)
      assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
      assert "API key" in refused.json()["error"]
    assert client.post(GOOD[0], json=GOOD[1]).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.post(GOOD[0], json=GOOD[1], headers=wrong).status_code == 401
    key = {"Authorization": "Bearer s3cret"}
    check_good(client.post(GOOD[0], json=GOOD[1], headers=key), engine)
    assert client.post("/search", json={"history": [], "query": " "},
                       headers=key).status_code == 422
    assert client.get("/docs", headers=key).status_code == 200
    missing = client.get("/nowhere", headers=key)
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    wrong_method = client.get("/search", headers=key)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    text = client.get("/metrics", headers=key).text
  assert 'gensar_requests_total{endpoint="search",status="200"} 1' in text
  assert 'gensar_requests_total{endpoint="search",status="422"} 1' in text
  assert 'gensar_requests_total{endpoint="search",status="401"} 2' in text
  assert 'gensar_requests_total{endpoint="search",status="405"} 1' in text
  assert 'gensar_requests_total{endpoint="other",status="404"} 1' in text
  assert 'gensar_request_seconds_count{endpoint="search"} 5' in text
  assert 'gensar_queue_depth{endpoint="recommend"} 0' in text
  assert 'gensar_batch_size_bucket{endpoint="search",le="+Inf"} 1' in text


def test_corrupt_artifacts_are_artifact_errors(engine, tmp_path):
  from gensar_jax.serving import artifact as artifact_lib
  source = engine.directory
  function = artifact_lib.function_file("search", BUCKETS[0])
  cases = {"metadata": (artifact_lib.METADATA_FILE, b"{not json", "JSON metadata"),
           "params": (artifact_lib.PARAMS_FILE, None, "msgpack parameters"),
           "function": (function, b"garbage" * 10, "a serialized JAX function")}
  for name, (file_name, content, message) in cases.items():
    broken = str(tmp_path / name)
    shutil.copytree(source, broken)
    path = os.path.join(broken, file_name)
    if content is None:  # truncated
      with open(path, "rb") as f:
        content = f.read()[:100]
    with open(path, "wb") as f:
      f.write(content)
    with pytest.raises(artifact_lib.ArtifactError, match=message) as e:
      ServingEngine(broken)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_serve_refuses_a_port_in_use_before_loading(tmp_path):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "gensar_jax.serve",
                             f"--artifact={tmp_path / 'does-not-matter'}", f"--port={port}"],
                            capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
  assert "Traceback" not in result.stderr and "does-not-matter" not in result.stderr


def test_sigterm_drains_queued_requests_then_exits_0(engine, tmp_path):
  """In-flight requests are answered; a request sent during the drain on a kept-alive
  connection gets 503 with `Connection: close` (not a read error); the exit status is 0."""
  port = free_port()
  server = subprocess.Popen([sys.executable, "-m", "gensar_jax.serve",
                             f"--artifact={engine.directory}", f"--port={port}",
                             "--max_wait_ms=800", "--log_level=warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    wait_until_ready(url, 180, server)
    with httpx.Client(base_url=url, timeout=60) as http, \
        futures.ThreadPoolExecutor(max_workers=3) as pool, \
        socket.create_connection(("127.0.0.1", port), timeout=30) as kept_alive:
      kept_alive.sendall(request_bytes("GET", "/healthz"))
      assert read_response(kept_alive, check_closed=False)[0] == 200
      pending = [pool.submit(http.post, GOOD[0], json=GOOD[1]) for _ in range(3)]
      time.sleep(0.3)  # queued in the batcher, which waits 800 ms for a fuller batch
      server.send_signal(signal.SIGTERM)
      time.sleep(0.3)
      kept_alive.sendall(request_bytes("POST", GOOD[0], json.dumps(GOOD[1]).encode()))
      status, headers, body, closed = read_response(kept_alive)
      assert status == 503 and headers["connection"] == "close" and closed, body
      assert "shutting down" in json.loads(body)["error"]
      for f in pending:
        check_good(f.result(), engine)
    assert server.wait(timeout=60) == 0
    assert "Traceback" not in server.stdout.read()
  finally:
    if server.poll() is None:
      server.kill()


# ------------------------------------------- the connection layer (issue 30, rows 10-15)


def read_response(sock, check_closed=True):
  """(status, headers, body, closed) of one HTTP/1.1 response read off a raw socket;
  `closed` (None unless check_closed): the server closed the connection after it."""
  data = b""
  while b"\r\n\r\n" not in data:
    chunk = sock.recv(65536)
    if not chunk:
      raise ConnectionError(f"closed before a response: {data!r}")
    data += chunk
  head, _, body = data.partition(b"\r\n\r\n")
  lines = head.decode("latin-1").split("\r\n")
  status = int(lines[0].split()[1])
  headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
  while len(body) < int(headers.get("content-length", 0)):
    chunk = sock.recv(65536)
    if not chunk:
      break
    body += chunk
  if not check_closed:
    return status, headers, body, None
  sock.settimeout(2)
  try:
    closed = sock.recv(1) == b""
  except socket.timeout:
    closed = False
  except ConnectionResetError:  # closed with our unread request still in its buffer
    closed = True
  return status, headers, body, closed


def request_bytes(method, path, body=b"", headers=()):
  lines = [f"{method} {path} HTTP/1.1", "Host: test", *headers]
  if body and not any(h.lower().startswith("content-length") for h in headers):
    lines.append(f"Content-Length: {len(body)}")
  return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@contextlib.contextmanager
def stub_server(api_key=None, **limits):
  """A real uvicorn server with the serve CLI's connection layer over the instant stub
  engine: the transport rules need no model."""
  from gensar_jax.serving import protocol
  port = free_port()
  server = protocol.server(create_app(SlowEngine(0.0), max_wait_ms=1.0, api_key=api_key),
                           "127.0.0.1", port, log_level="warning", **limits)
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  wait_until_ready(f"http://127.0.0.1:{port}", 30)
  try:
    yield port
  finally:
    server.should_exit = True
    thread.join(timeout=30)


def test_unparsable_content_length_gets_the_json_error_shape():
  with stub_server() as port:
    for length in ("abc", "9" * 40):
      with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request_bytes("POST", "/recommend", b"{}",
                                [f"Content-Length: {length}"]))
        status, headers, body, closed = read_response(s)
      assert status == 400 and headers["content-type"] == "application/json", body
      assert json.loads(body)["error"].startswith("invalid HTTP request"), body
      assert closed
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
      assert http.post("/recommend", json={"history": []}).status_code == 200


def test_a_request_dribbled_past_the_read_timeout_gets_408_and_is_closed():
  with stub_server(read_timeout_s=1.0) as port:
    body = json.dumps({"history": []}).encode()
    for name, first, rest in [
        ("body", request_bytes("POST", "/recommend", body)[:-5], None),
        ("headers", b"POST /recommend HTTP/1.1\r\nHost: te", b"st\r\n"),
        ("nothing", b"", None)]:
      with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        started = time.perf_counter()
        s.sendall(first)
        if rest:  # a byte now and then does not extend the deadline
          time.sleep(0.5)
          s.sendall(rest)
        status, headers, payload, closed = read_response(s)
        waited = time.perf_counter() - started
      assert status == 408, (name, payload)
      assert "not received within 1 s" in json.loads(payload)["error"], name
      assert closed and 0.9 < waited < 5, (name, waited)
    # A request sent whole is unaffected, also after the deadline of an earlier one.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
      for _ in range(2):
        s.sendall(request_bytes("POST", "/recommend", body))
        assert read_response(s, check_closed=False)[0] == 200
        time.sleep(0.6)


def test_connections_beyond_the_cap_get_503_and_are_closed():
  with stub_server(max_connections=4) as port:
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
    try:
      time.sleep(0.2)
      with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
        extra.sendall(request_bytes("GET", "/healthz"))
        status, headers, body, closed = read_response(extra)
      assert status == 503 and headers["retry-after"] == "1" and closed
      assert "4 open connections, its limit" in json.loads(body)["error"]
    finally:
      for s in held:
        s.close()
    time.sleep(0.3)
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200


def test_metrics_count_every_response_and_json_needs_no_content_type():
  key = {"Authorization": "Bearer k3y"}
  with stub_server(api_key="k3y") as port, \
      httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
    # curl -d sends a form content type; the body is read as JSON all the same.
    form = {"content-type": "application/x-www-form-urlencoded", **key}
    assert http.post("/recommend", content=b'{"history": [], "k": 1}',
                     headers=form).status_code == 200
    assert http.post("/recommend", content=b'{"history": []}', headers=key).status_code == 200
    assert http.post("/recommend", content=b"history=x", headers=form).status_code == 422
    assert http.post("/recommend", json={"history": []}).status_code == 401
    assert http.get("/nowhere", headers=key).status_code == 404
    assert http.get("/search", headers=key).status_code == 405
    for length, status in ((2 << 20, 413), ("abc", 400)):   # refused before any body
      with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request_bytes("POST", "/search", b"", [f"Content-Length: {length}",
                                                         f"Authorization: {key['Authorization']}"]))
        assert read_response(s)[0] == status
    text = http.get("/metrics", headers=key).text
  for endpoint, status, count in [("recommend", 200, 2), ("recommend", 422, 1),
                                  ("recommend", 401, 1), ("other", 404, 1),
                                  ("search", 405, 1), ("search", 413, 1), ("http", 400, 1),
                                  ("readyz", 200, 1)]:
    line = f'gensar_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}'
    assert line in text, (line, text)


def test_a_blank_api_key_is_refused(tmp_path):
  for value in ("", "   "):
    env = dict(os.environ, GENSAR_API_KEY=value)
    result = subprocess.run([sys.executable, "-m", "gensar_jax.serve",
                             f"--artifact={tmp_path / 'unused'}", f"--port={free_port()}"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("error: GENSAR_API_KEY is set but empty; set a key, or "
                                     "unset it to serve without auth")


def _with_metadata(source, target, **changes):
  """A copy of the artifact at `source` whose metadata.json says `changes`."""
  from gensar_jax.serving import artifact as artifact_lib
  shutil.copytree(source, target)
  path = os.path.join(target, artifact_lib.METADATA_FILE)
  with open(path, encoding="utf-8") as f:
    metadata = json.load(f)
  metadata.update(changes)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(metadata, f)
  return str(target)


def test_metadata_that_disagrees_with_the_compiled_functions_is_refused_at_load(engine,
                                                                                 tmp_path):
  """Issue 30, row 9: such an artifact used to load, answer /healthz and fail every query
  with an internal shape error; now it is one line at load time, and exit 2 from serve."""
  from gensar_jax.serving import artifact as artifact_lib
  lengths = dict(engine.metadata["feature_lengths"], inputs=engine.input_length + 16)
  cases = {"beams": ({"num_beams": BEAMS + 2}, f"num_beams {BEAMS + 2}"),
           "inputs": ({"feature_lengths": lengths},
                      f"compiled for int32[1, {engine.input_length}] at tokens")}
  for name, (changes, message) in cases.items():
    broken = _with_metadata(engine.directory, tmp_path / name, **changes)
    with pytest.raises(artifact_lib.ArtifactError, match=re.escape(message)) as e:
      ServingEngine(broken)
    assert "fn_search_b1.jaxexport" in str(e.value) and "\n" not in str(e.value)
  result = subprocess.run([sys.executable, "-m", "gensar_jax.serve",
                           f"--artifact={tmp_path / 'beams'}", f"--port={free_port()}"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith("error: ") and f"num_beams {BEAMS + 2}" in line
