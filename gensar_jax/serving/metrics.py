"""The server's Prometheus metrics, in the text exposition format (`GET /metrics`).

  gensar_requests_total{endpoint, status}         counter: every response by HTTP status
  gensar_request_seconds{endpoint}                histogram: wall time of search and recommend

`endpoint` is the route ("search", "recommend", "healthz", "readyz", "metrics", "docs",
"openapi"), "other" for any other path, and "http" for what the connection layer answers
before a route is read (an unparsable request, a read timeout, the connection cap, the
drain: gensar_jax/serving/protocol.py).
  gensar_queue_depth{endpoint}                    gauge: requests waiting for a batch
  gensar_batch_size{endpoint}                     histogram: requests per device call
  gensar_batch_retries_total{endpoint}            counter: failed batches rerun one by one

Written by hand (a few counters do not need a client library); the format is the one
Prometheus scrapes: `# HELP`/`# TYPE` lines, then `name{labels} value`, histograms as
cumulative `_bucket{le=...}` lines with `_sum` and `_count`.
"""
from __future__ import annotations

import threading
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
  def __init__(self, bounds: Sequence[float]):
    self.bounds = tuple(bounds)
    self.counts = [0] * (len(self.bounds) + 1)   # the last one is +Inf
    self.total = 0.0

  def observe(self, value: float, times: int = 1) -> None:
    index = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
    self.counts[index] += times
    self.total += value * times

  def lines(self, name: str, labels: str) -> List[str]:
    out, cumulative = [], 0
    for bound, count in zip(list(self.bounds) + [float("inf")], self.counts):
      cumulative += count
      le = "+Inf" if bound == float("inf") else repr(float(bound))
      out.append(f'{name}_bucket{{{labels},le="{le}"}} {cumulative}')
    out.append(f"{name}_sum{{{labels}}} {self.total:.6f}")
    out.append(f"{name}_count{{{labels}}} {cumulative}")
    return out


class ServerMetrics:
  """Counters the app updates per request; `render` reads the batchers' own counts."""

  def __init__(self, endpoints: Iterable[str]):
    self.endpoints = tuple(endpoints)
    self._lock = threading.Lock()
    self._requests: Dict[Tuple[str, int], int] = {}
    self._latency = {e: Histogram(LATENCY_BUCKETS_S) for e in self.endpoints}

  def record(self, endpoint: str, status: int, seconds: float) -> None:
    with self._lock:
      self._requests[(endpoint, status)] = self._requests.get((endpoint, status), 0) + 1
      if endpoint in self._latency:
        self._latency[endpoint].observe(seconds)

  def render(self, batchers: Mapping[str, object]) -> str:
    lines = ["# HELP gensar_requests_total Every response by endpoint and HTTP status.",
             "# TYPE gensar_requests_total counter"]
    with self._lock:
      for (endpoint, status), count in sorted(self._requests.items()):
        lines.append(f'gensar_requests_total{{endpoint="{endpoint}",status="{status}"}} '
                     f"{count}")
      lines += ["# HELP gensar_request_seconds Wall time of answered requests.",
                "# TYPE gensar_request_seconds histogram"]
      for endpoint, histogram in self._latency.items():
        lines += histogram.lines("gensar_request_seconds", f'endpoint="{endpoint}"')
    lines += ["# HELP gensar_queue_depth Requests waiting for a batch.",
              "# TYPE gensar_queue_depth gauge"]
    lines += [f'gensar_queue_depth{{endpoint="{e}"}} {b.depth}' for e, b in batchers.items()]
    lines += ["# HELP gensar_batch_size Requests per device call.",
              "# TYPE gensar_batch_size histogram"]
    for endpoint, batcher in batchers.items():
      sizes = Histogram(_size_bounds(batcher.max_batch_size))
      for size, count in dict(batcher.batch_sizes).items():
        sizes.observe(size, count)
      lines += sizes.lines("gensar_batch_size", f'endpoint="{endpoint}"')
    lines += ["# HELP gensar_batch_retries_total Failed batches rerun one request at a time.",
              "# TYPE gensar_batch_retries_total counter"]
    lines += [f'gensar_batch_retries_total{{endpoint="{e}"}} {b.batches_failed}'
              for e, b in batchers.items()]
    return "\n".join(lines) + "\n"


def _size_bounds(largest: int) -> List[int]:
  bounds, size = [], 1
  while size < largest:
    bounds.append(size)
    size *= 2
  return bounds + [largest]
