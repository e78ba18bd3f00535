"""Every `curl` example of the README and docs/serving.md, run as printed against a live
server (issue 30, row 14: the README's own example answered 422 for months because curl's
`-d` sends a form content type and nothing ran it).

The examples are found, not listed: each line of a fenced code block that starts with
`curl`, with its continuation lines (a trailing backslash or a quote still open). Only the
host and port are changed, to the test server's. The server is the serve CLI's (the app and
gensar_jax/serving/protocol.py's connection layer) over a stub engine that knows every item
id, so an example's ids need not exist in a test catalogue; the request the engine gets is
checked against the example's JSON. An example aimed at another server (TF Serving's REST
API) is recognised by its path and is not run here: OTHER_SERVERS lists those paths, and
an example matching neither is a failure, so a new gensar example cannot be skipped
silently.
"""
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading

import httpx
import pytest

from gensar_jax.serving import app as app_lib
from gensar_jax.serving import protocol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ("README.md", os.path.join("docs", "serving.md"))
OTHER_SERVERS = ("/v1/models/",)   # TF Serving's REST API (docs/serving.md, SavedModel)
URL = re.compile(r"(?:https?://)?(?:localhost|127\.0\.0\.1|0\.0\.0\.0|\[::1\]):\d+(/[^\s'\"]*)?")


def curl_examples(path):
  """(line number, command) of each curl example in the fenced code blocks of `path`."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  examples, in_block, i = [], False, 0
  while i < len(lines):
    line = lines[i]
    if line.lstrip().startswith("```"):
      in_block = not in_block
    elif in_block and re.match(r"\s*(\$\s+)?curl\s", line):
      start, command = i + 1, re.sub(r"^\s*(\$\s+)?", "", line)
      while _unfinished(command) and i + 1 < len(lines):
        i += 1
        command += "\n" + lines[i]
      examples.append((start, command))
    i += 1
  return examples


def _unfinished(command):
  if command.rstrip().endswith("\\"):
    return True
  try:
    shlex.split(command)
  except ValueError:  # a quote still open: the JSON goes on on the next line
    return True
  return False


def _body(command):
  """The request body of a curl command line (-d, --data, --data-raw or --json)."""
  args = shlex.split(command)
  flag = next(i for i, a in enumerate(args) if a in ("-d", "--data", "--data-raw", "--json"))
  return args[flag + 1]


ALL_EXAMPLES = [(name, number, command) for name in DOCUMENTS
                for number, command in curl_examples(os.path.join(REPO, name))]


class EveryItemEngine:
  """The app's Engine protocol: knows any item id, answers k hits, records each query."""
  max_batch_size = 4
  max_k = 10

  def __init__(self):
    self.queries = []

  def unknown_items(self, item_ids):
    return []

  def _answer(self, queries):
    self.queries.extend(queries)
    return [[app_lib.Hit(item_id=f"hit{j}", title=f"Hit {j}", score=-float(j))
             for j in range(q.k)] for q in queries]

  search = recommend = _answer

  def warm_up(self):
    pass


@pytest.fixture(scope="module")
def live():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  engine = EveryItemEngine()
  server = protocol.server(app_lib.create_app(engine, max_wait_ms=1.0), "127.0.0.1", port,
                           log_level="warning")
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{port}"
  for _ in range(300):
    try:
      if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
        break
    except httpx.HTTPError:
      pass
    threading.Event().wait(0.1)
  else:
    raise AssertionError("the test server never became ready")
  yield port, engine
  server.should_exit = True
  thread.join(timeout=30)


def test_the_documents_have_curl_examples():
  """The extraction finds the README's serving example (a change of layout that hid every
  example would otherwise pass the test below vacuously)."""
  assert any(name == "README.md" and "/search" in command
             for name, _, command in ALL_EXAMPLES), ALL_EXAMPLES


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl command")
@pytest.mark.parametrize("name,number,command", ALL_EXAMPLES,
                         ids=[f"{n}:{k}" for n, k, _ in ALL_EXAMPLES])
def test_curl_example_works_as_printed(live, name, number, command):
  port, engine = live
  match = URL.search(command)
  assert match, f"{name}:{number}: no local URL in {command!r}"
  route = match.group(1) or "/"
  if route.startswith(OTHER_SERVERS):
    pytest.skip(f"{name}:{number} is a request to another server ({route})")
  assert route in app_lib.ENDPOINTS, f"{name}:{number}: {route} is not a route of the server"
  runnable = URL.sub(lambda m: f"127.0.0.1:{port}{m.group(1) or ''}", command)
  before = len(engine.queries)
  result = subprocess.run(["bash", "-c", runnable], capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, (name, number, result.stderr)
  answer = json.loads(result.stdout)
  assert "error" not in answer, f"{name}:{number} as printed gets {answer}"
  if route in ("/search", "/recommend"):
    sent = json.loads(_body(command))
    (query,) = engine.queries[before:]
    assert len(answer["items"]) == query.k == sent.get("k", query.k)
    assert [(e.kind, e.item_id) for e in query.history] == [
        (e["kind"], e["item_id"]) for e in sent.get("history", [])]
    assert query.query == (sent["query"].strip() if route == "/search" else None)
