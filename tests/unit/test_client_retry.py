"""The client's retry policy: only UNAVAILABLE is retried, with exponential back-off and full jitter, for a
bounded number of attempts and never past the call's deadline; streams (Fit) are never retried. The loop
is tested with a fake clock; the wiring (deadline and token on every attempt) against an in-process
gRPC server that fails on purpose."""

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import gateway_pb2_grpc
from embeddings.v1 import recommender_pb2 as rec

from embeddings_client import AsyncClient, Client, InvalidArgument, Item, RetryPolicy, Unavailable
from embeddings_client.retry import acall_with_retry, call_with_retry
from tests.unit.test_client_errors import FakeRpcError

UNAVAILABLE = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "worker down")


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


class Flaky:
    """Fails with `errors` in turn, then answers "ok"; records the time left given to each attempt."""

    def __init__(self, *errors: grpc.RpcError) -> None:
        self.errors = list(errors)
        self.given: list[float] = []

    def __call__(self, remaining_s: float) -> str:
        self.given.append(remaining_s)
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def no_jitter(**options: Any) -> RetryPolicy:
    return RetryPolicy(random=lambda: 1.0, **options)


def test_unavailable_is_retried_with_exponential_back_off() -> None:
    fake, flaky = FakeTime(), Flaky(UNAVAILABLE, UNAVAILABLE, UNAVAILABLE)
    policy = no_jitter(max_attempts=4, initial_backoff_s=0.1, multiplier=2.0, max_backoff_s=10.0)
    assert call_with_retry(flaky, policy, 30.0, fake.sleep, fake.clock) == "ok"
    assert fake.waits == pytest.approx([0.1, 0.2, 0.4])
    assert flaky.given == pytest.approx([30.0, 29.9, 29.7, 29.3])  # one deadline over all attempts


def test_back_off_is_capped_and_jittered() -> None:
    policy = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=3.0, random=lambda: 0.5)
    assert [policy.backoff(n) for n in range(4)] == [0.5, 1.0, 1.5, 1.5]
    draws = [RetryPolicy(initial_backoff_s=1.0).backoff(0) for _ in range(200)]
    assert all(0.0 <= wait <= 1.0 for wait in draws) and len(set(draws)) > 100


def test_attempts_are_bounded() -> None:
    fake, flaky = FakeTime(), Flaky(*[UNAVAILABLE] * 10)
    with pytest.raises(Unavailable, match="worker down"):
        call_with_retry(flaky, no_jitter(max_attempts=3), 30.0, fake.sleep, fake.clock)
    assert len(flaky.given) == 3 and len(fake.waits) == 2


def test_no_retry_once_the_wait_would_pass_the_deadline() -> None:
    fake, flaky = FakeTime(), Flaky(*[UNAVAILABLE] * 10)
    policy = no_jitter(max_attempts=10, initial_backoff_s=0.4, multiplier=2.0, max_backoff_s=10.0)
    with pytest.raises(Unavailable):
        call_with_retry(flaky, policy, 1.0, fake.sleep, fake.clock)
    assert fake.waits == pytest.approx([0.4]) and fake.now < 1.0  # 0.8 more would pass the deadline


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAUTHENTICATED,
    ],
)
def test_other_codes_are_raised_at_once(code: grpc.StatusCode) -> None:
    fake, flaky = FakeTime(), Flaky(FakeRpcError(code, "no"))
    with pytest.raises(Exception) as caught:
        call_with_retry(flaky, no_jitter(), 30.0, fake.sleep, fake.clock)
    assert getattr(caught.value, "code", None) == code and len(flaky.given) == 1 and fake.waits == []


def test_the_asyncio_flavour_retries_the_same_way() -> None:
    fake, flaky = FakeTime(), Flaky(UNAVAILABLE, UNAVAILABLE)

    async def invoke(remaining_s: float) -> str:
        return flaky(remaining_s)

    result = asyncio.run(
        acall_with_retry(invoke, no_jitter(initial_backoff_s=0.1), 5.0, fake.asleep, fake.clock)
    )
    assert result == "ok" and fake.waits == pytest.approx([0.1, 0.2])


def test_a_policy_needs_at_least_one_attempt() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


# --- the wiring, against an in-process server ------------------------------------------------------------


def _drain(requests: Iterator[Any]) -> None:
    """Read the caller's whole stream before failing it: an asyncio client still writing when the status
    arrives reports INTERNAL "Internal error from Core" instead of the status (grpc/grpc#36066)."""
    for _ in requests:
        pass


class FailingGateway(gateway_pb2_grpc.GatewayServicer):
    """ListModels: UNAVAILABLE `failures` times, then OK. Fit, UpsertStream, EncodeStream: always UNAVAILABLE. Records every call's
    deadline and authorization metadata."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[tuple[str, float | None, str]] = []
        self.deadlines: list[float] = []  # each attempt's deadline, on this process's monotonic clock
        self.lock = threading.Lock()

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        token = dict(context.invocation_metadata()).get("authorization", "")
        remaining = context.time_remaining()
        with self.lock:
            self.calls.append((method, remaining, str(token)))
            if remaining is not None:
                self.deadlines.append(time.monotonic() + remaining)

    def ListModels(
        self, request: enc.ListModelsRequest, context: grpc.ServicerContext
    ) -> enc.ListModelsResponse:
        self._record("ListModels", context)
        if self.failures:
            self.failures -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return enc.ListModelsResponse()

    def Fit(
        self, request_iterator: Iterator[rec.FitRequest], context: grpc.ServicerContext
    ) -> Iterator[rec.FitProgress]:
        self._record("Fit", context)
        _drain(request_iterator)
        context.abort(grpc.StatusCode.UNAVAILABLE, "worker down")
        yield rec.FitProgress()

    def UpsertStream(
        self, request_iterator: Iterator[gw.UpsertRequest], context: grpc.ServicerContext
    ) -> Iterator[gw.UpsertResponse]:
        self._record("UpsertStream", context)
        _drain(request_iterator)
        context.abort(grpc.StatusCode.UNAVAILABLE, "shard down")
        yield gw.UpsertResponse()

    def EncodeStream(
        self, request_iterator: Iterator[enc.EncodeRequest], context: grpc.ServicerContext
    ) -> Iterator[enc.EncodeResponse]:
        self._record("EncodeStream", context)
        _drain(request_iterator)
        context.abort(grpc.StatusCode.UNAVAILABLE, "worker down")
        yield enc.EncodeResponse()

    def Search(self, request: object, context: grpc.ServicerContext) -> None:
        self._record("Search", context)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "k=0 is out of range")


@pytest.fixture
def serve() -> Iterator[Callable[[FailingGateway], str]]:
    servers: list[grpc.Server] = []

    def start(servicer: FailingGateway) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


# gRPC sends a deadline as a timeout of at most 8 digits, rounded up (to the millisecond, or coarser), and
# the server turns it back into a deadline on its own clock: each attempt's deadline, seen by the server,
# is the client's within this.
DEADLINE_SLACK_S = 0.1


def assert_one_deadline(servicer: FailingGateway, timeout_s: float, started: float) -> None:
    """Every attempt ran against the one deadline of the call (not a fresh one per retry): so each saw
    less time left than the one before, by at least the back-off waited between them."""
    remaining = [left for _, left, _ in servicer.calls]
    assert all(left is not None and left <= timeout_s + DEADLINE_SLACK_S for left in remaining), remaining
    # One deadline: the attempts' deadlines agree (a fresh one per retry would move each by the back-off
    # waited, 0.2 s or more), and it is no earlier than the call's timeout after the test began (it may be
    # later by the time the client took to start the call, on a busy machine).
    deadlines = servicer.deadlines
    assert max(deadlines) - min(deadlines) <= DEADLINE_SLACK_S, [deadline - started for deadline in deadlines]
    assert min(deadlines) >= started + timeout_s - DEADLINE_SLACK_S, [
        deadline - started for deadline in deadlines
    ]
    assert all(later < earlier for earlier, later in itertools.pairwise(remaining)), remaining  # type: ignore[operator]


def test_the_client_retries_unary_calls_with_its_deadline_and_token(
    serve: Callable[[FailingGateway], str],
) -> None:
    servicer = FailingGateway(failures=2)
    policy = RetryPolicy(initial_backoff_s=0.2, random=lambda: 1.0)  # waits 0.2 s, then 0.4 s
    started = time.monotonic()
    with Client(serve(servicer), token="sesame", timeout_s=5.0, retry=policy) as client:
        assert client.list_models() == []
    assert [method for method, _, _ in servicer.calls] == ["ListModels"] * 3
    assert_one_deadline(servicer, 5.0, started)
    assert {token for _, _, token in servicer.calls} == {"Bearer sesame"}


def test_the_asyncio_client_retries_against_a_server_with_its_deadline_and_token(
    serve: Callable[[FailingGateway], str],
) -> None:
    servicer = FailingGateway(failures=2)
    policy = RetryPolicy(initial_backoff_s=0.2, random=lambda: 1.0)

    async def call() -> list[Any]:
        async with AsyncClient(serve(servicer), token="sesame", timeout_s=5.0, retry=policy) as client:
            return await client.list_models()

    started = time.monotonic()
    assert asyncio.run(call()) == []
    assert [method for method, _, _ in servicer.calls] == ["ListModels"] * 3
    assert_one_deadline(servicer, 5.0, started)
    assert {token for _, _, token in servicer.calls} == {"Bearer sesame"}


def test_the_client_does_not_retry_fit_or_answers(serve: Callable[[FailingGateway], str]) -> None:
    servicer = FailingGateway(failures=0)
    with Client(serve(servicer), retry=RetryPolicy(initial_backoff_s=0.01)) as client:
        with pytest.raises(Unavailable, match="worker down"):
            list(client.fit([("u", "i", 1.0)], model="m"))
        with pytest.raises(InvalidArgument, match="k=0"):
            client.search("x", k=0)
    assert [method for method, _, _ in servicer.calls] == ["Fit", "Search"]


def test_streams_are_never_retried(serve: Callable[[FailingGateway], str]) -> None:
    servicer = FailingGateway(failures=0)
    with Client(serve(servicer), retry=RetryPolicy(initial_backoff_s=0.01)) as client:
        with pytest.raises(Unavailable, match="shard down"):
            list(client.upsert_stream([[Item("a", vector=np.ones(2, dtype=np.float32))]], space="s"))
        with pytest.raises(Unavailable, match="worker down"):
            list(client.encode_stream([["a text"]]))
    assert [method for method, _, _ in servicer.calls] == ["UpsertStream", "EncodeStream"]


# The README's defaults: 30 s for a unary call, 3600 s for a stream, when the caller gives none.
UNARY_DEFAULT_S, STREAM_DEFAULT_S = 30.0, 3600.0


def assert_default_deadlines(servicer: FailingGateway) -> None:
    """Each call's time left, as the server saw it on arrival: the default, less the little time taken to
    get there (a 10 s margin for a loaded machine), rounded up by gRPC's timeout header (coarsely for long
    timeouts: 3600 s arrives as 3610 s, so 1 % above)."""
    seen = {method: left for method, left, _ in servicer.calls}
    assert set(seen) == {"ListModels", "UpsertStream", "Fit"}, seen
    expected = {"ListModels": UNARY_DEFAULT_S, "UpsertStream": STREAM_DEFAULT_S, "Fit": STREAM_DEFAULT_S}
    for method, default_s in expected.items():
        left = seen[method]
        assert left is not None and default_s - 10 < left <= default_s * 1.01, (method, left)


def test_calls_without_a_timeout_get_the_default_deadlines(serve: Callable[[FailingGateway], str]) -> None:
    servicer = FailingGateway(failures=0)
    with Client(serve(servicer)) as client:
        assert client.list_models() == []
        with pytest.raises(Unavailable):
            list(client.upsert_stream([[Item("a", vector=np.ones(2, dtype=np.float32))]], space="s"))
        with pytest.raises(Unavailable):
            list(client.fit([("u", "i", 1.0)], model="m"))
    assert_default_deadlines(servicer)


def test_the_asyncio_client_has_the_same_default_deadlines(serve: Callable[[FailingGateway], str]) -> None:
    servicer = FailingGateway(failures=0)

    async def calls() -> None:
        async with AsyncClient(serve(servicer)) as client:
            assert await client.list_models() == []
            with pytest.raises(Unavailable):
                batches = [[Item("a", vector=np.ones(2, dtype=np.float32))]]
                _ = [ack async for ack in client.upsert_stream(batches, space="s")]
            with pytest.raises(Unavailable):
                _ = [progress async for progress in client.fit([("u", "i", 1.0)], model="m")]

    asyncio.run(calls())
    assert_default_deadlines(servicer)
