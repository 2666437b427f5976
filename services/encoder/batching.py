"""Dynamic micro-batching: gather concurrent requests into model batches, run them off the event loop.

Every input of every request joins one bounded queue, per caller. The loop forms a batch as soon as it
has `max_batch_size` inputs or `max_batch_tokens` tokens, or once the oldest has waited `max_wait_s`,
whichever comes first, taking the callers' inputs in turn (fairness.py), so a caller with many inputs
waiting shares each batch with the others rather than making them wait behind all of its inputs; while the
model runs, new inputs accumulate, so under load batches fill without any waiting. A request larger than a
batch is split across batches. Past `max_queue` waiting inputs, submit refuses at once with
RESOURCE_EXHAUSTED rather than queueing forever, and inputs whose caller has gone (cancelled) or whose
deadline has passed are dropped before they reach the model.

A model pads every input of a call to the longest one, so a batch is not run as it was taken: its inputs
are sorted by length and cut into the groups that cost the least padding plus per-call overhead
(`by_length`), one model call each, all in one turn of the model thread.

A backend that runs concurrent calls well (ONNX Runtime with a single-threaded session per call) asks for
`lanes` > 1: then up to that many batches run at once, each on a model thread of its own, and a batch is
taken whenever a lane is free. On a machine whose cores the gRPC server and the tokenizer share, one
single-threaded call per core wasted less than one call spread over every core, whose threads wait for
each other at every operator (README, Performance).
"""

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from services.common.errors import DeadlineExceeded, ResourceExhausted
from services.encoder import metrics
from services.encoder.fairness import RoundRobin

T = TypeVar("T")
R = TypeVar("R")

# What one more model call costs beyond its tokens, in tokens: for MiniLM on ONNX Runtime on 2 cores a
# call of one 4-token input took about as long as 8-16 tokens inside a batch (README, Performance).
CALL_COST_TOKENS = 16


@dataclass(eq=False)
class _Request(Generic[T]):
    items: Sequence[T]
    future: asyncio.Future[list[Any]]
    deadline: float | None
    results: list[Any] = field(default_factory=list)
    remaining: int = 0

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)
        self.remaining = len(self.items)


class MicroBatcher(Generic[T, R]):
    """Batches calls to `process(items) -> results` (one result per item, same order)."""

    def __init__(
        self,
        name: str,
        process: Callable[[list[T]], Sequence[R] | np.ndarray],
        executor: Executor,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        max_batch_tokens: int = 0,
        length: Callable[[T], int] = lambda _: 1,
        lanes: int = 1,
    ) -> None:
        """`length(item)`: the tokens the model pads `item` to the batch's longest from (1 for inputs of
        one size, such as images); `max_batch_tokens`: most tokens in one batch, 0: no limit; `lanes`:
        most batches running at once (`executor` needs that many threads)."""
        if lanes < 1:
            raise ValueError(f"{name}: lanes must be at least 1, got {lanes}")
        self.name = name
        self._process = process
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._length = length
        self._lanes = asyncio.Semaphore(lanes)
        self._running: set[asyncio.Task[None]] = set()
        self._queue: RoundRobin[tuple[_Request[T], int, float]] = RoundRobin()
        self._queued_tokens = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._depth = metrics.QUEUE_DEPTH.labels(name)
        self._batch_sizes = metrics.BATCH_SIZE.labels(name)

    @property
    def queued(self) -> int:
        """Inputs waiting for a batch."""
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        tasks = [*([self._task] if self._task is not None else []), *self._running]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def submit(self, items: Sequence[T], timeout: float | None = None, caller: str = "") -> list[R]:
        """Queue `items` as `caller`'s; return their results in order. `timeout`: seconds the caller will wait."""
        if not items:
            return []
        if len(self._queue) + len(items) > self.max_queue:
            metrics.QUEUE_REJECTED.labels(self.name).inc(len(items))
            raise ResourceExhausted(
                f"{self.name}: {len(self._queue)} inputs already queued (limit {self.max_queue}); "
                "retry with back-off or send smaller batches"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        request: _Request[T] = _Request(
            items, loop.create_future(), None if timeout is None else now + timeout
        )
        for i, item in enumerate(items):
            self._queue.push(caller, (request, i, now))
            self._queued_tokens += self._length(item)
        self._depth.set(len(self._queue))
        self._arrived.set()
        return await request.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._queue:
                await self._lanes.acquire()
                await self._fill(loop)
                batch = self._take(loop.time())
                if not batch:
                    self._lanes.release()
                    continue
                task = loop.create_task(self._execute(loop, batch), name=f"batch-{self.name}")
                self._running.add(task)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._lanes.release()

    async def _fill(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for a full batch, or until the oldest queued input has waited max_wait_s."""
        oldest = min(arrived for _, _, arrived in self._queue.heads())
        while len(self._queue) < self.max_batch_size and not self._tokens_full(self._queued_tokens):
            remaining = oldest + self.max_wait_s - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _tokens_full(self, tokens: int) -> bool:
        return bool(self.max_batch_tokens) and tokens >= self.max_batch_tokens

    def _take(self, now: float) -> list[tuple[_Request[T], int]]:
        """The next batch, the callers' inputs in turn, within max_batch_size and max_batch_tokens (an input
        longer than max_batch_tokens makes a batch on its own)."""
        batch: list[tuple[_Request[T], int]] = []
        tokens = 0
        dropped = 0
        while self._queue and len(batch) < self.max_batch_size:
            request, index, _ = self._queue.peek()
            length = self._length(request.items[index])
            if batch and self.max_batch_tokens and tokens + length > self.max_batch_tokens:
                break
            self._queue.pop()
            self._queued_tokens -= length
            if request.future.done():
                dropped += 1
                continue
            if request.deadline is not None and now > request.deadline:
                request.future.set_exception(
                    DeadlineExceeded(f"{self.name}: the call's deadline passed while it waited in the queue")
                )
                dropped += 1
                continue
            batch.append((request, index))
            tokens += length
        self._depth.set(len(self._queue))
        if dropped:
            metrics.DROPPED.labels(self.name).inc(dropped)
        return batch

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[_Request[T], int]]) -> None:
        self._batch_sizes.observe(len(batch))
        items = [request.items[index] for request, index in batch]
        try:
            results = await loop.run_in_executor(self._executor, self._run_by_length, items)
        except Exception as error:
            for request, _ in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        for (request, index), result in zip(batch, results, strict=True):
            if request.future.done():
                continue
            request.results[index] = result
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(request.results)

    def _run_by_length(self, items: list[T]) -> list[R]:
        """`process` on each group of similar length (by_length); the results in the items' order."""
        results: list[R] = [None] * len(items)  # type: ignore[list-item]
        for group in by_length([self._length(item) for item in items], CALL_COST_TOKENS):
            rows = self._process([items[i] for i in group])
            if len(rows) != len(group):
                raise RuntimeError(
                    f"{self.name}: the model returned {len(rows)} results for {len(group)} inputs"
                )
            for i, row in zip(group, rows, strict=True):
                results[i] = row
        return results


def by_length(lengths: Sequence[int], call_cost: int) -> list[list[int]]:
    """Positions of `lengths` grouped so that padding each group to its longest, plus `call_cost` per group,
    costs the fewest tokens: the groups are runs of the lengths in sorted order, chosen by dynamic
    programming (O(n^2), n being at most a batch). Equal lengths keep their order; so does a batch of one
    length, which stays one group."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    # best[j]: the cheapest cost of the first j sorted inputs; cut[j]: where its last group starts.
    best = [0] + [0] * len(order)
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        longest = sorted_lengths[j - 1]
        best[j], cut[j] = min((best[i] + (j - i) * longest + call_cost, i) for i in range(j))
    groups: list[list[int]] = []
    j = len(order)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]
