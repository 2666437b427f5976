"""Typed exceptions for the gateway's status codes: one class per code, each carrying the code and the
service's message, so callers catch `NotFound` or `InvalidArgument` instead of inspecting a grpc.RpcError."""

import grpc


class EmbeddingsError(Exception):
    """A call failed with a gRPC status other than OK."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class Cancelled(EmbeddingsError):
    code = grpc.StatusCode.CANCELLED


class InvalidArgument(EmbeddingsError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(EmbeddingsError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(EmbeddingsError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(EmbeddingsError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(EmbeddingsError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(EmbeddingsError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(EmbeddingsError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(EmbeddingsError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(EmbeddingsError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(EmbeddingsError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(EmbeddingsError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[EmbeddingsError]] = {
    error.code: error
    for error in (
        Cancelled,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Unimplemented,
        Internal,
        Unavailable,
        Unauthenticated,
    )
}


def error_for(code: grpc.StatusCode, message: str) -> EmbeddingsError:
    """The exception for `code`: its own class, or `EmbeddingsError` for codes without one."""
    return _BY_CODE.get(code, EmbeddingsError)(code, message)


def from_rpc_error(error: grpc.RpcError) -> EmbeddingsError:
    """The typed exception for a failed call (sync `grpc.Call` or `grpc.aio.AioRpcError`)."""
    code, details = getattr(error, "code", None), getattr(error, "details", None)
    return error_for(
        code() if callable(code) else grpc.StatusCode.UNKNOWN,
        (details() if callable(details) else str(error)) or "",
    )
