"""Bearer tokens: parsing, the token set and its file, and the interceptor's open and protected methods."""

import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import auth
from services.common.auth import BearerAuthInterceptor, CredentialFileError, Tokens, bearer_token


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ([("authorization", "Bearer abc")], "abc"),
        ([("authorization", "bearer  abc ")], "abc"),
        ([("x-other", "1"), ("authorization", "BEARER abc")], "abc"),
        ([("authorization", "Basic abc")], None),
        ([("authorization", "Bearer ")], None),
        ([("authorization", "abc")], None),
        ([("authorization-bin", b"abc")], None),
        ([], None),
        (None, None),
    ],
)
def test_bearer_token_reads_only_the_bearer_scheme(
    metadata: list[tuple[str, str | bytes]] | None, token: str | None
) -> None:
    assert bearer_token(metadata) == token


def test_listed_tokens_are_accepted_and_nothing_else() -> None:
    tokens = Tokens([" one", "two ", ""])
    assert tokens.enabled
    assert tokens.accepts("one") and tokens.accepts("two")
    assert not tokens.accepts("") and not tokens.accepts("one two") and not tokens.accepts("ONE")


def test_no_tokens_means_authentication_is_off() -> None:
    assert not Tokens([""]).enabled


def test_a_tokens_file_is_read_with_comments_and_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# ops team\n\n  first  \nsecond\n")
    tokens = Tokens([], str(path))
    assert tokens.accepts("first") and tokens.accepts("second")
    assert not tokens.accepts("# ops team")


def test_a_changed_file_replaces_its_tokens_and_a_vanished_one_keeps_them(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("old\n")
    tokens = Tokens(["fixed"], str(path), recheck_s=0.0)
    path.write_text("new-token\n")
    os.utime(path, ns=(1, 1))  # a different stamp even within one clock tick
    assert tokens.accepts("new-token") and not tokens.accepts("old") and tokens.accepts("fixed")
    path.unlink()
    assert tokens.accepts("new-token")


@pytest.mark.parametrize("content", [None, "", "# nothing here\n\n"])
def test_a_missing_or_empty_tokens_file_is_an_error_at_start(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CredentialFileError, match="GATEWAY_AUTH_TOKENS_FILE"):
        Tokens([], str(path))


@pytest.fixture
async def health_server(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """An in-process server with only the health service, behind the interceptor."""
    interceptor = BearerAuthInterceptor(Tokens(["secret"]), protect_health=request.param)
    server = grpc.aio.server(interceptors=[interceptor])
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def check(address: str, token: str | None) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), metadata=metadata, timeout=5
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("health_server", [False], indirect=True)
async def test_health_is_open_by_default(health_server: str) -> None:
    assert await check(health_server, None) == grpc.StatusCode.OK


@pytest.mark.parametrize("health_server", [True], indirect=True)
async def test_health_needs_a_token_when_protected(health_server: str) -> None:
    assert await check(health_server, None) == grpc.StatusCode.UNAUTHENTICATED
    assert await check(health_server, "wrong") == grpc.StatusCode.UNAUTHENTICATED
    assert await check(health_server, "secret") == grpc.StatusCode.OK


def test_a_changed_file_is_read_again_within_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README promises rotation within a second: checked on a clock the test moves, not the wall's."""
    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    path = tmp_path / "tokens"
    path.write_text("old\n")
    tokens = Tokens([], str(path))  # the default recheck period
    assert tokens.accepts("old")
    path.write_text("rotated\n")
    os.utime(path, ns=(1, 1))  # a different stamp even within one clock tick
    clock[0] += 1.0
    assert tokens.accepts("rotated") and not tokens.accepts("old")
