"""Admission and fair preparation: the decoding and tokenising of requests, before their inputs are batched.

A request is admitted before anything is spent on it, by its cost (characters of text, pixels of images,
read from their headers): past `max_queued_cost` for all callers, or past `caller_share` of it for one
caller, it is refused at once with RESOURCE_EXHAUSTED. An admitted request is cut into chunks of about
`chunk_cost`, which `threads` preparation threads take from the callers in turn (fairness.py), so one
caller's heavy request delays another's light one by a chunk at most, not by the whole request. A chunk
whose caller has gone or whose deadline has passed is dropped before it is worked on.
"""

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from embeddings.v1 import types_pb2 as pb

from services.common.errors import DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from services.encoder import metrics
from services.encoder.backend import EncoderBackend, Prepared
from services.encoder.fairness import RoundRobin

log = logging.getLogger("encoder.preparing")


@dataclass(frozen=True)
class PrepareLimits:
    threads: int
    max_queued_cost: int  # all callers together
    caller_share: float  # of max_queued_cost, the most one caller may hold
    chunk_cost: int
    setting: str  # the setting of max_queued_cost, for messages (e.g. TEXT_MAX_QUEUED_CHARS)
    unit: str  # what a unit of cost is, for messages ("characters", "pixels")


@dataclass(eq=False)
class _Chunk:
    prepare: Callable[[Sequence[pb.Input], bool], list[Prepared]]
    inputs: Sequence[pb.Input]
    positions: list[int]  # of the inputs in their request
    strict: bool
    deadline: float | None
    done: asyncio.Future[list[Prepared]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Preparer:
    def __init__(self, name: str, limits: PrepareLimits) -> None:
        self._name = name
        self._limits = limits
        self._threads = ThreadPoolExecutor(limits.threads, thread_name_prefix="prepare")
        self._waiting: RoundRobin[_Chunk] = RoundRobin()
        self._running = 0
        self._queued_cost = 0
        self._cost_of: dict[str, int] = {}
        self._closed = False

    async def prepare(
        self,
        backend: EncoderBackend,
        inputs: Sequence[pb.Input],
        strict: bool,
        timeout: float | None,
        caller: str,
    ) -> list[Prepared]:
        """`inputs` prepared by `backend`, in order, once admitted; refusals name the input as `inputs[i]`."""
        if self._closed:
            raise Unavailable(f"{self._name} is shutting down; retry on another instance")
        costs = [max(1, backend.cost(item)) for item in inputs]
        cost = sum(costs)
        self._admit(caller, cost)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        chunks = [
            _Chunk(backend.prepare, [inputs[p] for p in positions], positions, strict, deadline)
            for positions in _cut(costs, self._limits.chunk_cost)
        ]
        for chunk in chunks:
            self._waiting.push(caller, chunk)
        self._dispatch()
        try:
            prepared: list[Prepared] = []
            for chunk in chunks:  # in order: the first bad input is the one a refusal names
                try:
                    prepared += await chunk.done
                except ServiceError as error:
                    raise error.moved("inputs", chunk.positions, "inputs") from None
            return prepared
        finally:
            for chunk in chunks:
                chunk.done.cancel()  # chunks not started yet are dropped when their turn comes
            self._release(caller, cost)

    def _admit(self, caller: str, cost: int) -> None:
        limits = self._limits
        share = int(limits.max_queued_cost * limits.caller_share)
        held = self._cost_of.get(caller, 0)
        if held + cost > share:
            raise ResourceExhausted(
                f"{self._name}: this request holds {cost:,} {limits.unit} and this caller has {held:,} waiting; one "
                f"caller may have {share:,} waiting ({limits.caller_share:g} of {limits.setting}={limits.max_queued_cost:,}): "
                "send fewer or smaller inputs per request, or wait for earlier requests to finish"
            )
        if self._queued_cost + cost > limits.max_queued_cost:
            raise ResourceExhausted(
                f"{self._name}: {self._queued_cost:,} {limits.unit} are waiting to be prepared, and this request "
                f"holds {cost:,} more than {limits.setting}={limits.max_queued_cost:,} allows; retry with back-off"
            )
        self._queued_cost += cost
        self._cost_of[caller] = held + cost
        metrics.QUEUED_COST.labels(self._name).set(self._queued_cost)

    def _release(self, caller: str, cost: int) -> None:
        self._queued_cost -= cost
        left = self._cost_of[caller] - cost
        if left:
            self._cost_of[caller] = left
        else:
            del self._cost_of[caller]
        metrics.QUEUED_COST.labels(self._name).set(self._queued_cost)

    def _dispatch(self) -> None:
        """Start the callers' chunks in turn while a thread is free; drop those no one waits for."""
        loop = asyncio.get_running_loop()
        while self._running < self._limits.threads and self._waiting:
            chunk = self._waiting.pop()
            if chunk.done.done():  # the caller has gone (or an earlier chunk of its request failed)
                metrics.DROPPED.labels(self._name).inc(len(chunk.inputs))
                continue
            if chunk.deadline is not None and loop.time() > chunk.deadline:
                chunk.done.set_exception(
                    DeadlineExceeded(
                        f"{self._name}: the call's deadline passed before its inputs were prepared"
                    )
                )
                metrics.DROPPED.labels(self._name).inc(len(chunk.inputs))
                continue
            self._running += 1
            work = loop.run_in_executor(self._threads, chunk.prepare, chunk.inputs, chunk.strict)
            work.add_done_callback(functools.partial(self._finished, chunk))

    def _finished(self, chunk: _Chunk, work: asyncio.Future[list[Prepared]]) -> None:
        self._running -= 1
        if not chunk.done.done():
            if work.cancelled():
                chunk.done.cancel()
            elif (error := work.exception()) is not None:
                chunk.done.set_exception(error)
            else:
                chunk.done.set_result(work.result())
        if not self._closed:
            self._dispatch()

    def close(self) -> None:
        """Take no more requests, drop the chunks not started, and let the threads end after the ones
        they are working on."""
        self._closed = True
        for chunk in self._waiting.drain():
            chunk.done.cancel()
        self._threads.shutdown(wait=False, cancel_futures=True)


def _cut(costs: list[int], chunk_cost: int) -> list[list[int]]:
    """Positions 0..len(costs)-1 cut into runs of about `chunk_cost` (each at least one input)."""
    chunks: list[list[int]] = [[]]
    held = 0
    for position, cost in enumerate(costs):
        if chunks[-1] and held + cost > chunk_cost:
            chunks.append([])
            held = 0
        chunks[-1].append(position)
        held += cost
    return chunks
