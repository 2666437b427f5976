"""Bidirectional bulk streams: handle several requests of a stream concurrently, answer in order."""

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar, cast

Req = TypeVar("Req")
Resp = TypeVar("Resp")

_END = object()


async def ordered_pipeline(
    requests: AsyncIterator[Req], handle: Callable[[Req], Awaitable[Resp]], window: int
) -> AsyncIterator[Resp]:
    """Yield handle(request) for each request in arrival order, with up to `window` in flight.

    Each answer goes out as soon as it and those before it are ready, whether or not the caller has
    sent more (a caller that sends one request and waits for its answer gets it). Reading stops while
    the window is full, so a fast sender is slowed to the service's pace (gRPC flow control does the
    rest); the first failure ends the stream with that error.
    """
    pending: collections.deque[asyncio.Task[Resp]] = collections.deque()
    reading: asyncio.Task[object] | None = None
    ended = False
    try:
        while not ended or pending:
            if reading is None and not ended and len(pending) < window:
                reading = asyncio.ensure_future(anext(requests, _END))
            waiting: set[asyncio.Future[object]] = {reading} if reading is not None else set()
            if pending:
                waiting.add(cast(asyncio.Future[object], pending[0]))
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            while pending and pending[0].done():
                yield pending.popleft().result()
            if reading is not None and reading.done():
                request, reading = reading.result(), None
                if request is _END:
                    ended = True
                else:
                    pending.append(asyncio.ensure_future(handle(cast(Req, request))))
    finally:
        for task in (*pending, *([reading] if reading is not None else [])):
            task.cancel()
