"""Server interceptors wrap a method's behaviour; gRPC has four kinds of method handler. This rebuilds a
handler of the same kind around a wrapped behaviour, so each interceptor writes its wrapping once."""

from collections.abc import Callable
from typing import Any

import grpc

Behaviour = Callable[..., Any]
# (the method's behaviour, whether its request is a stream) -> the behaviour to run instead
Wrap = Callable[[Behaviour, bool], Behaviour]


def rewrapped(
    handler: grpc.RpcMethodHandler,
    unary: Wrap,
    streaming: Wrap,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped by `unary` (methods answering one message) or `streaming`
    (methods answering a stream); `request_deserializer` replaces the handler's when given."""
    codec = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary, False), **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary, True), **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream, False), **codec)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream, True), **codec)


def is_open_service(method: str) -> bool:
    """Health and reflection: answered for anyone, never counted against a caller's limits."""
    return method.startswith(("/grpc.health.", "/grpc.reflection."))
