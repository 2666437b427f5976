"""One server interceptor for every service: exceptions become status codes; calls are counted and timed.

Handlers raise ServiceError subclasses (errors.py) with a message that says what to fix; anything else
is a bug and answers INTERNAL naming only the exception's class: its text and traceback (which may hold
the server's paths or other callers' data) go to the log. A request that is not a valid
protobuf message of the method's type (corrupt or truncated bytes, invalid UTF-8 in a string field) answers
INVALID_ARGUMENT: gRPC itself would answer UNKNOWN with a Python exception name. Health and reflection
calls pass through untouched.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from services.common import metrics
from services.common.errors import InvalidArgument, ServiceError
from services.common.handlers import rewrapped
from services.common.limits import SHUTTING_DOWN

log = logging.getLogger("rpc")


class Undecodable:
    """Stands in for a request message whose bytes did not parse, so the handler can answer for it."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error

    def refuse(self, method: str) -> InvalidArgument:
        return InvalidArgument(
            f"the {method} request is not a valid protobuf message of its type ({self.error}); "
            "check the message type, that strings are valid UTF-8 and that the bytes are complete"
        )


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            return Undecodable(error)

    return parse


async def _checked(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.refuse(method)
        yield request


class StatusInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service: str) -> None:
        self._service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full_method = handler_call_details.method
        if handler is None or full_method.startswith("/grpc."):
            return handler
        method = full_method.rsplit("/", 1)[-1]
        return rewrapped(
            handler,
            lambda behaviour, streamed: self._unary(behaviour, method, streamed),
            lambda behaviour, streamed: self._streaming(behaviour, method, streamed),
            _tolerant(handler.request_deserializer),
        )

    @contextlib.asynccontextmanager
    async def _observed(self, context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
        """Time and count one call; answer its caller for any exception raised inside."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except BaseException as error:
            code = self._code_of(error, context)
            await self._answer(error, context, method)
            raise
        finally:
            self._record(method, code, started)

    def _unary(
        self, behaviour: Callable[..., Any], method: str, streamed: bool = False
    ) -> Callable[..., Any]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._observed(context, method):
                return await behaviour(_request(request, method, streamed), context)

        return handle

    def _streaming(
        self, behaviour: Callable[..., Any], method: str, streamed: bool = False
    ) -> Callable[..., Any]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._observed(context, method):
                async for response in behaviour(_request(request, method, streamed), context):
                    yield response

        return handle

    @staticmethod
    def _code_of(error: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
        if isinstance(error, ServiceError):
            return error.code
        if _ended_by_shutdown(error):
            return grpc.StatusCode.UNAVAILABLE
        if isinstance(error, asyncio.CancelledError | GeneratorExit):  # the caller went away
            return grpc.StatusCode.CANCELLED
        if isinstance(error, grpc.aio.AbortError):
            return context.code() or grpc.StatusCode.UNKNOWN
        return grpc.StatusCode.INTERNAL

    async def _answer(self, error: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
        """Abort the call with the status `error` stands for; cancellations and aborts pass as they are."""
        if isinstance(error, ServiceError):
            log.info("%s.%s -> %s: %s", self._service, method, error.code.name, error.message)
            await context.abort(error.code, error.message, error.status_details())
        elif _ended_by_shutdown(error):
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self._service}: {SHUTTING_DOWN}")
        elif not isinstance(error, asyncio.CancelledError | GeneratorExit | grpc.aio.AbortError):
            log.exception("%s.%s failed", self._service, method)
            # The exception's text stays in the log: it may hold the server's paths or other callers' data.
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error in {self._service}.{method} ({type(error).__name__}); the server logged it",
            )

    def _record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        metrics.REQUESTS.labels(self._service, method, code.name).inc()
        metrics.LATENCY.labels(self._service, method).observe(time.perf_counter() - started)


def _ended_by_shutdown(error: BaseException) -> bool:
    """A cancellation by CallLimits.end_calls (the service stopping), not by the caller."""
    return isinstance(error, asyncio.CancelledError) and error.args == (SHUTTING_DOWN,)


def _request(request: Any, method: str, streamed: bool) -> Any:
    """The request, or the stream of requests, that a handler may read: undecodable ones are refused."""
    if streamed:
        return _checked(request, method)
    if isinstance(request, Undecodable):
        raise request.refuse(method)
    return request
