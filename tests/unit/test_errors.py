"""Errors: one class per status code, field positions carried as google.rpc.BadRequest details through a
real gRPC call, and a relay pointing them at the caller's own request by index."""

from collections.abc import AsyncIterator

import grpc
import pytest
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc as enc_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.common import errors
from services.common.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ServiceError,
    error_for,
)
from services.common.interceptor import StatusInterceptor
from services.gateway.relaying import relayed


@pytest.mark.parametrize("code", [code for code in grpc.StatusCode if code not in (grpc.StatusCode.OK,)])
def test_every_code_has_its_own_class_except_unknown(code: grpc.StatusCode) -> None:
    error = error_for(code, "why")
    assert error.message == "why"
    if code == grpc.StatusCode.UNKNOWN:
        assert type(error) is Internal
    else:
        assert error.code == code and type(error) is not ServiceError
        assert type(error).__name__.lower() == code.name.replace("_", "").lower()


def test_a_field_error_names_its_field_first() -> None:
    error = InvalidArgument("is empty", field="inputs[3].text")
    assert (error.message, error.field, error.description) == (
        "inputs[3].text is empty",
        "inputs[3].text",
        "is empty",
    )
    assert str(error) == "inputs[3].text is empty"


@pytest.mark.parametrize(
    ("field", "positions", "moved"),
    [
        ("inputs[1].text", [4, 7], "items[7].text"),
        ("inputs[0]", [2], "items[2]"),
        ("inputs[12].image", list(range(100, 120)), "items[112].image"),
    ],
)
def test_moved_points_a_field_of_the_sent_request_at_the_callers(
    field: str, positions: list[int], moved: str
) -> None:
    error = NotFound("'x' is not a user", field=field).moved("inputs", positions, "items")
    assert isinstance(error, NotFound)
    assert (error.field, error.message) == (moved, f"{moved} 'x' is not a user")


@pytest.mark.parametrize(
    "field",
    [
        "",
        "inputs",
        "query",
        "inputsx[1].text",
        "inputs[a].text",
        "inputs[9].text",
        "options.dtype",
        "inputs[1",
    ],
)
def test_moved_leaves_other_fields_alone(field: str) -> None:
    error = InvalidArgument("is wrong", field=field)
    assert error.moved("inputs", [5, 6], "items") is error


def test_details_round_trip_through_the_status_metadata() -> None:
    sent = NotFound("'u9' is not a user of model 'mf'", field="inputs[2].user_id")
    back = error_for(sent.code, sent.message, sent.status_details())
    assert type(back) is NotFound
    assert (back.field, back.description, back.message) == (sent.field, sent.description, sent.message)


def test_details_that_do_not_make_the_message_are_ignored() -> None:
    """A violation whose field and description do not spell the status message is not trusted."""
    metadata = InvalidArgument("is empty", field="inputs[0].text").status_details()
    back = error_for(grpc.StatusCode.INVALID_ARGUMENT, "something else entirely", metadata)
    assert (back.field, back.message) == ("", "something else entirely")


class _Refusing(enc_grpc.EncoderServicer):
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def Encode(
        self, request: enc.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> enc.EncodeResponse:
        raise self.error


@pytest.fixture
async def refusing() -> AsyncIterator[tuple[str, _Refusing]]:
    """An in-process Encoder behind the status interceptor, raising whatever error the test sets."""
    servicer = _Refusing(InvalidArgument("unset"))
    server = grpc.aio.server(interceptors=[StatusInterceptor("test")])
    enc_grpc.add_EncoderServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(None)


async def _call(address: str) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await enc_grpc.EncoderStub(channel).Encode(enc.EncodeRequest(), timeout=5)
    return caught.value


async def test_a_field_error_reaches_the_caller_as_a_bad_request_detail(
    refusing: tuple[str, _Refusing],
) -> None:
    address, servicer = refusing
    servicer.error = InvalidArgument(
        "is empty; send at least one non-blank character", field="inputs[1].text"
    )
    error = await _call(address)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "inputs[1].text is empty; send at least one non-blank character"
    status = rpc_status.from_call(error)  # grpcio-status checks the details agree with code and message
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("inputs[1].text", "is empty; send at least one non-blank character")
    ]

    relayed_error = relayed(error, "worker w").moved("inputs", [3, 8], "queries")
    assert type(relayed_error) is errors.InvalidArgument
    assert relayed_error.message == "queries[8].text is empty; send at least one non-blank character"


async def test_an_error_without_a_field_sends_no_details(refusing: tuple[str, _Refusing]) -> None:
    address, servicer = refusing
    servicer.error = FailedPrecondition("call Fit first")
    error = await _call(address)
    assert (error.code(), error.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "call Fit first")
    assert rpc_status.from_call(error) is None
    relayed_error = relayed(error, "user-item worker w")
    assert type(relayed_error) is FailedPrecondition and relayed_error.message == "call Fit first"


@pytest.mark.parametrize(
    ("code", "reworded"),
    [
        (grpc.StatusCode.UNAVAILABLE, "worker w is unavailable (gone); retry shortly"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "worker w did not answer within the deadline"),
    ],
)
async def test_a_relay_names_the_backend_when_the_backend_is_the_problem(
    refusing: tuple[str, _Refusing], code: grpc.StatusCode, reworded: str
) -> None:
    address, servicer = refusing
    servicer.error = error_for(code, "gone")
    relayed_error = relayed(await _call(address), "worker w")
    assert (relayed_error.code, relayed_error.message) == (code, reworded)


async def test_a_bug_answers_internal_without_the_exceptions_text(refusing: tuple[str, _Refusing]) -> None:
    """An exception that is no ServiceError is a bug: its text (here a path of the server) stays in the log."""
    address, servicer = refusing
    servicer.error = PermissionError(13, "Permission denied", "/srv/secret/data/mf/CURRENT.tmp")
    error = await _call(address)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error in test.Encode (PermissionError); the server logged it"
