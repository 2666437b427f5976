"""Bidirectional bulk streams: handle several requests of a stream concurrently, answer in order."""

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def ordered_pipeline(
    requests: AsyncIterator[Req], handle: Callable[[Req], Awaitable[Resp]], window: int
) -> AsyncIterator[Resp]:
    """Yield handle(request) for each request in arrival order, with up to `window` in flight.

    Reading stops while the window is full, so a fast sender is slowed to the service's pace
    (gRPC flow control does the rest); the first failure ends the stream with that error.
    """
    pending: collections.deque[asyncio.Task[Resp]] = collections.deque()
    try:
        async for request in requests:
            pending.append(asyncio.ensure_future(handle(request)))
            if len(pending) >= window:
                yield await pending.popleft()
        while pending:
            yield await pending.popleft()
    finally:
        for task in pending:
            task.cancel()
