"""How much of a service one call, one caller and all callers may hold: calls in flight, in all and per
caller, and streams that go quiet.

Calls are counted here rather than by gRPC's `maximum_concurrent_rpcs`, so a call past a limit always ends
RESOURCE_EXHAUSTED with a message and is counted (gRPC's own limit let refused calls end CANCELLED,
uncounted), and so health checks and reflection are never refused. A stream whose caller sends nothing
for `*_STREAM_IDLE_TIMEOUT_S` while the service waits for its next message (and sends it no answer) ends
DEADLINE_EXCEEDED: idle streams cannot hold the service's call slots.
"""

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.common import metrics
from services.common.callers import CALLER, caller_of
from services.common.errors import DeadlineExceeded, ResourceExhausted
from services.common.handlers import Behaviour, is_open_service, rewrapped

_END = object()
# How long a refused stream's messages are read before its status is sent (see CallLimits._admit).
_DRAIN_S = 0.5
# The cancellation of a call that outlived the shutdown grace: the status interceptor answers it UNAVAILABLE.
SHUTTING_DOWN = "the service is shutting down and the call outlived its grace: retry it on another instance"


async def _drain(requests: AsyncIterator[Any]) -> None:
    async for _ in requests:
        pass


class _Activity:
    """When the service last sent the caller an answer on a stream (loop time)."""

    def __init__(self) -> None:
        self.answered = 0.0


class CallLimits(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        service: str,
        prefix: str,
        max_calls: int,
        max_calls_per_caller: int,
        stream_idle_timeout_s: float,
        trust_named_callers: bool,
    ) -> None:
        """`prefix`: the service's settings prefix, for messages. `trust_named_callers`: a caller named in
        the call's metadata is taken as the caller (workers and shards: the gateway names its callers)."""
        self._prefix = prefix
        self._max_calls = max_calls
        self._max_per_caller = max_calls_per_caller
        self._idle_s = stream_idle_timeout_s
        self._trust_named = trust_named_callers
        self._in_flight = 0
        self._per_caller: collections.Counter[str] = collections.Counter()
        self._calls: set[asyncio.Task[Any]] = set()  # the tasks of the calls in flight
        self._idle = asyncio.Event()
        self._gauge = metrics.IN_FLIGHT.labels(service)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or is_open_service(handler_call_details.method):
            return handler
        return rewrapped(handler, self._unary, self._streaming)

    async def _admit(self, context: grpc.aio.ServicerContext, requests: AsyncIterator[Any] | None) -> str:
        """Count the call against the limits, as the call of its caller (returned; `_release` it when the
        call ends). A refused stream first takes the messages its caller has already sent (for at most
        _DRAIN_S): an asyncio client still writing when the status arrives reports INTERNAL "Internal error
        from Core" instead of the status (grpc/grpc#36066)."""
        caller = caller_of(context.invocation_metadata(), context.peer(), self._trust_named)
        refusal = None
        if self._max_calls and self._in_flight >= self._max_calls:
            refusal = ResourceExhausted(
                f"the service is handling {self._in_flight} calls, its limit ({self._prefix}MAX_CONCURRENT_CALLS); "
                "retry with back-off"
            )
        elif self._max_per_caller and self._per_caller[caller] >= self._max_per_caller:
            refusal = ResourceExhausted(
                f"this caller has {self._per_caller[caller]} calls in flight, the limit per caller "
                f"({self._prefix}MAX_CALLS_PER_CLIENT); wait for some to end, or retry with back-off"
            )
        if refusal is not None:
            if requests is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(_drain(requests), _DRAIN_S)
            raise refusal
        self._in_flight += 1
        self._per_caller[caller] += 1
        self._gauge.set(self._in_flight)
        self._calls.add(asyncio.current_task())  # type: ignore[arg-type]  # a handler runs in a task
        self._idle.clear()
        return caller

    def _release(self, caller: str, task: asyncio.Task[Any] | None) -> None:
        self._in_flight -= 1
        self._per_caller[caller] -= 1
        if not self._per_caller[caller]:
            del self._per_caller[caller]
        self._gauge.set(self._in_flight)
        self._calls.discard(task)  # type: ignore[arg-type]
        if not self._in_flight:
            self._idle.set()

    async def end_calls(self, grace_s: float) -> None:
        """On shutdown (new calls already refused): give the calls in flight `grace_s` to finish, then end
        the rest with UNAVAILABLE (the status interceptor answers a cancellation with SHUTTING_DOWN so):
        a caller retries elsewhere rather than losing the connection mid-call."""
        if self._in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
        for task in list(self._calls):
            task.cancel(SHUTTING_DOWN)
        if self._calls:
            await asyncio.wait(self._calls, timeout=grace_s + 5)

    def _unary(self, behaviour: Behaviour, streamed: bool) -> Behaviour:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            caller = await self._admit(context, request if streamed else None)
            task = asyncio.current_task()
            CALLER.set(caller)  # each call runs in a task of its own, whose context ends with it
            try:
                return await behaviour(self._paced(request, _Activity()) if streamed else request, context)
            finally:
                self._release(caller, task)

        return handle

    def _streaming(self, behaviour: Behaviour, streamed: bool) -> Behaviour:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            caller = await self._admit(context, request if streamed else None)
            task = asyncio.current_task()
            CALLER.set(caller)
            try:
                activity = _Activity()
                loop = asyncio.get_running_loop()
                async for response in behaviour(
                    self._paced(request, activity) if streamed else request, context
                ):
                    activity.answered = loop.time()
                    yield response
            finally:
                self._release(caller, task)

        return handle

    async def _paced(self, requests: AsyncIterator[Any], activity: _Activity) -> AsyncIterator[Any]:
        """The caller's messages, ending the call when the caller sends none for the idle timeout while one
        is awaited (time spent answering it, or handling earlier messages, does not count)."""
        if not self._idle_s:
            async for request in requests:
                yield request
            return
        loop = asyncio.get_running_loop()
        iterator = aiter(requests)
        while True:
            waiting_since = loop.time()
            reading = asyncio.ensure_future(anext(iterator, _END))
            try:
                while not reading.done():
                    left = max(waiting_since, activity.answered) + self._idle_s - loop.time()
                    if left <= 0:
                        raise DeadlineExceeded(
                            f"the caller sent nothing on this stream for {self._idle_s:g} s while the service "
                            f"waited for its next message ({self._prefix}STREAM_IDLE_TIMEOUT_S); send messages "
                            "more often, or end the stream when done"
                        )
                    await asyncio.wait({reading}, timeout=left)
            except BaseException:
                reading.cancel()
                raise
            request = reading.result()
            if request is _END:
                return
            yield request
