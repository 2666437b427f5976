"""gRPC status codes become typed exceptions that carry the code and the service's message."""

import grpc
import pytest

import embeddings_client as ec
from embeddings_client.errors import error_for, from_rpc_error


class FakeRpcError(grpc.RpcError):
    """What a failed call raises: an RpcError with code() and details()."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.CANCELLED, ec.Cancelled),
        (grpc.StatusCode.INVALID_ARGUMENT, ec.InvalidArgument),
        (grpc.StatusCode.DEADLINE_EXCEEDED, ec.DeadlineExceeded),
        (grpc.StatusCode.NOT_FOUND, ec.NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, ec.AlreadyExists),
        (grpc.StatusCode.PERMISSION_DENIED, ec.PermissionDenied),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ec.ResourceExhausted),
        (grpc.StatusCode.FAILED_PRECONDITION, ec.FailedPrecondition),
        (grpc.StatusCode.UNIMPLEMENTED, ec.Unimplemented),
        (grpc.StatusCode.INTERNAL, ec.Internal),
        (grpc.StatusCode.UNAVAILABLE, ec.Unavailable),
        (grpc.StatusCode.UNAUTHENTICATED, ec.Unauthenticated),
    ],
)
def test_each_status_code_has_its_exception(code: grpc.StatusCode, kind: type[ec.EmbeddingsError]) -> None:
    error = from_rpc_error(FakeRpcError(code, "inputs[3].text is empty"))
    assert type(error) is kind and isinstance(error, ec.EmbeddingsError)
    assert (error.code, error.message) == (code, "inputs[3].text is empty")
    assert str(error) == f"{code.name}: inputs[3].text is empty"


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.ABORTED]
)
def test_codes_without_a_class_are_the_base_exception_with_their_code(code: grpc.StatusCode) -> None:
    error = error_for(code, "something")
    assert type(error) is ec.EmbeddingsError and error.code == code


def test_an_rpc_error_without_a_status_is_unknown_and_keeps_its_text() -> None:
    error = from_rpc_error(grpc.RpcError("channel closed"))
    assert error.code == grpc.StatusCode.UNKNOWN and error.message == "channel closed"


def test_missing_details_become_an_empty_message() -> None:
    assert from_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, None)).message == ""
