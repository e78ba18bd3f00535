"""Request batching for the server: many concurrent HTTP requests, one device call.

A compiled decode costs about the same for 1 example as for a full bucket, so the server
queues requests for up to `max_wait_ms` (or until `max_batch_size` are waiting) and runs
them together. Device calls run on one worker thread: the event loop stays free to accept
and validate requests while the accelerator works, and calls never interleave.

A failure stays with the request that caused it: when a batch of several requests fails,
each of them is run again alone, so only the culprit gets the error and the others their
answers (at the cost of one device call per request of that batch).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Callable, Dict, Generic, List, Optional, Sequence, Tuple, TypeVar

class QueueFull(Exception):
  """More requests are waiting than the batcher admits (the server answers 503)."""


Request = TypeVar("Request")
Result = TypeVar("Result")


class Batcher(Generic[Request, Result]):
  """Groups requests into batches for `run_batch(requests) -> results` (same order)."""

  def __init__(self, run_batch: Callable[[Sequence[Request]], Sequence[Result]],
               max_batch_size: int, max_wait_ms: float = 5.0,
               executor: Optional[concurrent.futures.Executor] = None,
               max_queue: Optional[int] = None):
    if max_batch_size < 1:
      raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if max_queue is not None and max_queue < 1:
      raise ValueError(f"max_queue must be >= 1 or None, got {max_queue}")
    # Admission bound: beyond it a request is refused at once instead of waiting behind
    # work that already takes longer than any client will wait (p99 would grow with load).
    self.max_queue = max_queue
    self.batch_sizes: Dict[int, int] = {}   # batch size -> how many batches ran at it
    self._run_batch = run_batch
    self.max_batch_size = max_batch_size
    self.max_wait_s = max_wait_ms / 1000.0
    self._executor = executor or concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._queue: Optional[asyncio.Queue] = None
    self._task: Optional[asyncio.Task] = None
    self.batches_run = 0
    self.requests_run = 0
    self.batches_failed = 0      # batches of several requests that were retried one by one
    self.requests_failed = 0

  def start(self) -> None:
    self._queue = asyncio.Queue()
    self._task = asyncio.get_running_loop().create_task(self._loop())

  async def stop(self) -> None:
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
      self._task = None

  @property
  def depth(self) -> int:
    """Requests waiting for a batch (not counting the batch on the device)."""
    return self._queue.qsize() if self._queue is not None else 0

  async def submit(self, request: Request) -> Result:
    """Queues one request and waits for its result (exceptions propagate to the caller).
    Raises QueueFull at once when `max_queue` requests are already waiting."""
    if self._queue is None:
      raise RuntimeError("Batcher.start() was not called")
    if self.max_queue is not None and self._queue.qsize() >= self.max_queue:
      raise QueueFull(f"{self._queue.qsize()} requests are waiting (the limit)")
    future = asyncio.get_running_loop().create_future()
    await self._queue.put((request, future))
    return await future

  async def _next_batch(self) -> List[Tuple[Request, asyncio.Future]]:
    batch = [await self._queue.get()]
    deadline = time.monotonic() + self.max_wait_s
    while len(batch) < self.max_batch_size:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        break
      try:
        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
      except asyncio.TimeoutError:
        break
    return batch

  async def _loop(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      batch = await self._next_batch()
      live = [(r, f) for r, f in batch if not f.cancelled()]
      if not live:
        continue
      try:
        results = await self._run(loop, [r for r, _ in live])
      except Exception as e:  # pylint: disable=broad-except
        if len(live) == 1:
          self._fail(live[0][1], e)
          continue
        self.batches_failed += 1
        for request, future in live:  # alone, so only the culprit fails
          try:
            self._succeed(future, (await self._run(loop, [request]))[0])
          except Exception as alone:  # pylint: disable=broad-except
            self._fail(future, alone)
        continue
      self.batches_run += 1
      self.batch_sizes[len(live)] = self.batch_sizes.get(len(live), 0) + 1
      for (_, future), result in zip(live, results):
        self._succeed(future, result)

  async def _run(self, loop, requests: List[Request]) -> Sequence[Result]:
    results = await loop.run_in_executor(self._executor, self._run_batch, requests)
    if len(results) != len(requests):
      raise RuntimeError(f"run_batch returned {len(results)} results for "
                         f"{len(requests)} requests")
    return results

  def _succeed(self, future: asyncio.Future, result: Result) -> None:
    self.requests_run += 1
    if not future.done():
      future.set_result(result)

  def _fail(self, future: asyncio.Future, error: Exception) -> None:
    self.requests_failed += 1
    if not future.done():
      future.set_exception(error)
