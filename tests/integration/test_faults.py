"""Faults with real processes, most of them under concurrent load: Redis killed (or frozen) under the
gateway and brought back; a worker killed and restarted at the same address; an index shard killed (or
frozen) and restarted from its data directory; a worker that is overloaded, stopped, or slow (a fake one
that sleeps: deadlines are honoured and the gateway's calls to it do not pile up)."""

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import pytest
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc, gateway_pb2_grpc, index_pb2_grpc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import index_pb2 as idx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.processes import (
    RedisServer,
    Service,
    free_port,
    gateway,
    health_status,
    index_shard,
    running,
    text_worker,
)
from services.common.vectors import to_wire
from services.gateway.sharding import shard_of
from tests.fake_encoder import FakeEncoder, fake_encoder, fake_vector
from tests.helpers import metric, texts, vectors

pytestmark = pytest.mark.integration

LONG = "The quick brown fox jumps over the lazy dog while the band plays on. " * 12  # ~170 tokens
CALLERS = 6  # concurrent callers of each load: enough to overlap calls, few enough for 2 shared cores
# A call that started less than this before a backend came back (or was thawed) may have met it: the
# gateway can reach the backend a while after the call started, on a busy machine. Such calls are left
# out of the checks of what happened while it was down.
MARGIN_S = 0.5


# --- load: concurrent callers, every call's outcome recorded --------------------------------------------


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    code: grpc.StatusCode
    details: str = ""
    result: Any = None

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    @property
    def elapsed(self) -> float:
        return self.ended - self.started


class Load:
    """`callers` callers on this event loop, each awaiting `call(caller, number)` again and again from
    `async with` until its end, `pause_s` after an answer and `error_pause_s` after an error (as a client
    backs off). A gRPC error is an outcome like any answer; anything else raised is a bug of the test and
    fails it. Blocking work inside the block must go through asyncio.to_thread."""

    def __init__(
        self,
        call: Callable[[int, int], Awaitable[Any]],
        callers: int = CALLERS,
        pause_s: float = 0.01,
        error_pause_s: float = 0.05,
    ) -> None:
        self._call = call
        self._callers = callers
        self._pause_s = pause_s
        self._error_pause_s = error_pause_s
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.outcomes: list[Outcome] = []

    async def __aenter__(self) -> "Load":
        self._tasks = [asyncio.create_task(self._caller(number)) for number in range(self._callers)]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _caller(self, caller: int) -> None:
        number = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                result = await self._call(caller, number)
                outcome = Outcome(started, time.monotonic(), grpc.StatusCode.OK, result=result)
            except grpc.aio.AioRpcError as error:
                outcome = Outcome(started, time.monotonic(), error.code(), error.details() or "")
            self.outcomes.append(outcome)
            number += 1
            await asyncio.sleep(self._pause_s if outcome.ok else self._error_pause_s)

    async def first(self, predicate: Callable[[Outcome], bool], timeout: float) -> Outcome | None:
        """The first outcome (already recorded, or within `timeout` seconds) for which `predicate` holds."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((outcome for outcome in self.outcomes if predicate(outcome)), None)
            if found is not None or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(0.02)

    async def answered(self, count: int, after: float = 0.0, timeout: float = 30.0) -> None:
        """Wait until `count` calls that started after `after` have ended."""
        done = await eventually(lambda: len(self.started_between(after, float("inf"))) >= count, timeout)
        assert done, f"fewer than {count} calls ended within {timeout}s: {summary(self.outcomes)}"

    def started_between(self, start: float, end: float) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if start < outcome.started < end]


async def eventually(predicate: Callable[[], bool], timeout: float) -> bool:
    """Whether `predicate` holds within `timeout` seconds (polled, without blocking the event loop)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)


def summary(outcomes: list[Outcome]) -> str:
    codes = Counter(outcome.code.name for outcome in outcomes)
    slowest = max((outcome.elapsed for outcome in outcomes), default=0.0)
    return f"{len(outcomes)} calls {dict(codes)}, slowest {slowest:.3f}s"


# --- Redis killed, or frozen, under load -----------------------------------------------------------------
# The gateway encodes through a fake worker that answers at once (tests/fake_encoder.py), so a call's time
# is the gateway's and Redis's, not a model's on a busy machine: its bound can be tight enough to mean
# something about GATEWAY_REDIS_TIMEOUT_S.

REDIS_TIMEOUT_S = 0.2  # GATEWAY_REDIS_TIMEOUT_S
REDIS_RETRY_S = 0.5  # GATEWAY_REDIS_RETRY_S
ENCODE_DEADLINE_S = 5.0  # each load call's deadline
# No Encode may take longer than this, Redis dead, frozen or fine: at most a get and a put that time out
# (2 x REDIS_TIMEOUT_S), plus a few ms of work, given 0.6 s for a busy shared machine. Redis calls that were
# retried, or waited on for longer than the timeout, would break it (and waiting until the deadline would
# fail the call).
SLOWEST_ENCODE_S = 2 * REDIS_TIMEOUT_S + 0.6
# Redis back (answering PING) -> a repeated input comes back `cached`: what is left of REDIS_RETRY_S, one
# call to write the entry, the next to read it; plus REDIS_RETRY_S more for each pooled connection from
# before the crash (at most one per concurrent caller) that fails once when it is next used: 0.4-2.0 s
# seen, CALLERS x REDIS_RETRY_S + 1 s at worst; generous beyond that for the busy machine.
CACHE_RECOVERY_S = CALLERS * REDIS_RETRY_S + 3.0
HOT = [f"a sentence the callers ask for again and again, number {n}" for n in range(8)]


@pytest.fixture(scope="module")
def own_redis(log_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(log_dir=log_dir)
    server.start()
    try:
        yield server
    finally:
        server.signal(signal.SIGCONT)  # in case a failed test left it frozen
        server.stop()


@pytest.fixture(scope="module")
def instant_worker() -> Iterator[FakeEncoder]:
    with fake_encoder(delay_s=0.0) as worker:
        yield worker


@pytest.fixture(scope="module")
def cached_gateway(log_dir: Path, instant_worker: FakeEncoder, own_redis: RedisServer) -> Iterator[Service]:
    settings = {"GATEWAY_REDIS_TIMEOUT_S": str(REDIS_TIMEOUT_S), "GATEWAY_REDIS_RETRY_S": str(REDIS_RETRY_S)}
    with running(gateway([instant_worker.address], own_redis.url, settings, log_dir)) as service:
        yield service


def cache_errors(service: Service) -> float:
    return sum(metric(service.metrics_port, "cache_errors_total", op=op) for op in ("get", "put"))


def hot_and_new(
    stub: gateway_pb2_grpc.GatewayStub, tag: str
) -> Callable[[int, int], Awaitable[tuple[list[str], enc.EncodeResponse]]]:
    """A load call: one repeated text (cached while Redis is up) and one never sent before (never cached);
    its result is (the texts, the response)."""

    async def call(caller: int, number: int) -> tuple[list[str], enc.EncodeResponse]:
        sent = [HOT[(caller + number) % len(HOT)], f"{tag}: a new text from caller {caller}, call {number}"]
        request = enc.EncodeRequest(inputs=texts(*sent))
        return sent, await stub.Encode(request, timeout=ENCODE_DEADLINE_S)

    return call


def hot_cached(outcome: Outcome) -> bool:
    return outcome.ok and outcome.result[1].embeddings[0].cached


def check_encode_load(outcomes: list[Outcome]) -> None:
    """Every call answered, none slower than SLOWEST_ENCODE_S, each text's vector right whether it came
    from the cache or not, new texts never `cached`."""
    failed = [outcome for outcome in outcomes if not outcome.ok]
    assert failed == [], f"{summary(outcomes)}; e.g. {failed[:3]}"
    slowest = max(outcomes, key=lambda outcome: outcome.elapsed)
    assert slowest.elapsed <= SLOWEST_ENCODE_S, summary(outcomes)
    for outcome in outcomes:
        sent, response = outcome.result
        assert not response.embeddings[1].cached
        for text, vector in zip(sent, vectors(response), strict=True):
            expected = fake_vector(text)
            np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), rtol=1e-6)


async def test_redis_killed_and_restarted_under_load_no_encode_fails_and_the_cache_comes_back(
    cached_gateway: Service, own_redis: RedisServer
) -> None:
    async with grpc.aio.insecure_channel(cached_gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        await stub.Encode(enc.EncodeRequest(inputs=texts(*HOT)), timeout=30)  # in the cache from here on
        errors_before = cache_errors(cached_gateway)
        async with Load(hot_and_new(stub, "kill"), pause_s=0.02) as load:
            await load.answered(24)  # steady load first
            killing = time.monotonic()
            await asyncio.to_thread(own_redis.kill)  # SIGKILL
            killed = time.monotonic()
            await asyncio.sleep(2.0)
            errors_while_down = await asyncio.to_thread(cache_errors, cached_gateway)
            restarting = time.monotonic()
            await asyncio.to_thread(own_redis.start)  # same port, empty: as after a crash
            up = time.monotonic()
            back = await load.first(
                lambda outcome: outcome.started > up and hot_cached(outcome), CACHE_RECOVERY_S
            )
            if back is not None:  # and load after the recovery too
                await load.answered(12, after=back.ended)
        errors_after = cache_errors(cached_gateway)

    outcomes = load.outcomes
    print(
        f"\nRedis killed under load: {summary(outcomes)}; cached again {back and back.ended - up:.2f}s after "
        f"Redis answered; cache errors: {errors_while_down - errors_before:.0f} while down, "
        f"{errors_after - errors_while_down:.0f} after"
    )
    check_encode_load(outcomes)
    before = [outcome for outcome in outcomes if outcome.ended < killing]
    down = load.started_between(killed, restarting - MARGIN_S)
    assert len(before) >= 20 and all(hot_cached(outcome) for outcome in before), summary(before)
    assert len(down) >= 10, f"only {len(down)} calls while Redis was down"
    assert not any(hot_cached(outcome) for outcome in down)  # answered without the cache
    assert errors_while_down > errors_before  # and the failures counted
    assert back is not None, f"no repeated input came back cached within {CACHE_RECOVERY_S}s of Redis"


async def test_redis_frozen_under_load_costs_no_more_than_its_timeout(
    cached_gateway: Service, own_redis: RedisServer
) -> None:
    """SIGSTOP: connections stay open and nothing answers, so only GATEWAY_REDIS_TIMEOUT_S bounds a call."""
    async with grpc.aio.insecure_channel(cached_gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        errors_before = cache_errors(cached_gateway)
        async with Load(hot_and_new(stub, "freeze"), pause_s=0.02) as load:
            await load.answered(24)  # steady load first
            own_redis.signal(signal.SIGSTOP)
            frozen = time.monotonic()
            try:
                await asyncio.sleep(2.5)
            finally:
                own_redis.signal(signal.SIGCONT)
            thawed = time.monotonic()
            back = await load.first(
                lambda outcome: outcome.started > thawed and hot_cached(outcome), CACHE_RECOVERY_S
            )
            if back is not None:  # and load after the recovery too
                await load.answered(12, after=back.ended)
        errors = cache_errors(cached_gateway) - errors_before

    print(f"\nRedis frozen under load: {summary(load.outcomes)}; {errors:.0f} cache errors")
    check_encode_load(load.outcomes)
    frozen_calls = load.started_between(frozen + REDIS_TIMEOUT_S, thawed - REDIS_TIMEOUT_S - MARGIN_S)
    assert len(frozen_calls) >= 10 and not any(hot_cached(outcome) for outcome in frozen_calls)
    assert errors >= 1  # the timeouts were counted
    assert back is not None, f"no repeated input came back cached within {CACHE_RECOVERY_S}s of the thaw"


# --- a worker: loading, overloaded, killed under load, stopped -----------------------------------------

WORKER_DEADLINE_S = 5.0  # each load call's deadline: far above an encode's time, even on a busy machine
# A call while the worker is down or loading is refused at once (connection refused, or the worker
# answers "loading"): UNAVAILABLE in milliseconds, not by waiting out the deadline. Half the deadline, for
# a gateway starved of CPU while the worker loads its model on a busy machine (1.7 s seen with two extra
# busy loops on the 2 cores).
REFUSED_WITHIN_S = WORKER_DEADLINE_S / 2
RECONNECT_MAX_S = 0.5  # GATEWAY_WORKER_RECONNECT_MAX_S
# Worker SERVING -> calls through the gateway succeed: the gateway's channel tries again within
# RECONNECT_MAX_S (+20% jitter) of its last attempt, then one call (gRPC's default back-off would allow up
# to 120 s). The worker listens while it loads, so the channel usually reconnects before SERVING and this
# is mostly the first call's time (0.0-0.3 s here, 1.6 s with two extra busy loops). Generous for that.
WORKER_RECOVERY_S = RECONNECT_MAX_S * 1.2 + 3.0


@pytest.fixture(scope="module")
def lifecycle_worker(log_dir: Path, text_cache_dir: Path) -> Iterator[Service]:
    """A worker of its own, with a small queue, not started: each test starts it as it needs (`started`)."""
    settings = {"TEXT_MAX_QUEUE": "64", "TEXT_SHUTDOWN_GRACE_S": "20", "TEXT_CACHE_DIR": str(text_cache_dir)}
    worker = text_worker(settings, log_dir)
    yield worker
    worker.kill()


def started(worker: Service) -> Service:
    """The module's worker, started (again) if it is not running: no test relies on another's start."""
    if not worker.running():
        restart(worker)
    return worker


def test_health_is_serving_only_after_the_model_loaded(lifecycle_worker: Service) -> None:
    if lifecycle_worker.running():
        lifecycle_worker.kill()  # to watch a start from the beginning
    lifecycle_worker.start()
    seen: list[str] = []
    refused_while_loading = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not seen or seen[-1] != "SERVING"):
        status = health_status(lifecycle_worker.address, timeout=0.5)
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == "NOT_SERVING" and refused_while_loading is None:
            with grpc.insecure_channel(lifecycle_worker.address) as channel:
                try:
                    encoder_pb2_grpc.EncoderStub(channel).Encode(
                        enc.EncodeRequest(inputs=texts("early")), timeout=5
                    )
                except grpc.RpcError as error:
                    refused_while_loading = error
        time.sleep(0.05)
    assert seen[-1] == "SERVING", seen
    assert "NOT_SERVING" in seen and seen.index("NOT_SERVING") < seen.index("SERVING"), seen
    if refused_while_loading is not None:  # the model may finish loading between the two calls
        assert refused_while_loading.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in refused_while_loading.details()


async def test_overload_gets_resource_exhausted_then_serves(lifecycle_worker: Service) -> None:
    await asyncio.to_thread(started, lifecycle_worker)
    async with grpc.aio.insecure_channel(lifecycle_worker.address) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        calls = [
            stub.Encode(enc.EncodeRequest(inputs=texts(*[f"{LONG} {i}.{j}" for j in range(16)])), timeout=60)
            for i in range(12)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        codes = [r.code() if isinstance(r, grpc.aio.AioRpcError) else grpc.StatusCode.OK for r in results]
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        rejected = next(r for r in results if isinstance(r, grpc.aio.AioRpcError))
        assert "limit 64" in rejected.details()
        assert len((await stub.Encode(enc.EncodeRequest(inputs=texts("fine again")))).embeddings) == 1
    assert (
        metric(lifecycle_worker.metrics_port, "batch_queue_rejected_total", batcher="all-MiniLM-L6-v2") >= 16
    )


def restart(worker: Service) -> None:
    worker.start()  # the same port
    worker.wait_serving()


async def test_a_worker_killed_under_load_gets_unavailable_then_the_gateway_reconnects(
    lifecycle_worker: Service, log_dir: Path
) -> None:
    settings = {"GATEWAY_WORKER_RECONNECT_MAX_S": str(RECONNECT_MAX_S)}
    address = (await asyncio.to_thread(started, lifecycle_worker)).address
    with running(gateway([address], "", settings, log_dir)) as service:  # no cache: every call to the worker
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)

            def call(caller: int, number: int) -> Awaitable[Any]:
                request = enc.EncodeRequest(inputs=texts(f"under load: caller {caller}, call {number}"))
                return stub.Encode(request, timeout=WORKER_DEADLINE_S)

            async with Load(call, pause_s=0.02) as load:
                await load.answered(24)  # steady load first
                killing = time.monotonic()
                await asyncio.to_thread(lifecycle_worker.kill)  # SIGKILL
                killed = time.monotonic()
                await asyncio.sleep(2.0)
                restarting = time.monotonic()
                await asyncio.to_thread(restart, lifecycle_worker)
                serving = time.monotonic()  # the worker reported SERVING (polled: up to 0.1 s late)
                back = await load.first(
                    lambda outcome: outcome.started > killed and outcome.ok, WORKER_RECOVERY_S
                )
                if back is not None:  # and load after the recovery too
                    await load.answered(12, after=back.ended)
        failures = metric(service.metrics_port, "worker_failures_total", worker=address, code="UNAVAILABLE")

    outcomes = load.outcomes
    print(
        f"\nworker killed under load: {summary(outcomes)}; restart: SERVING {serving - restarting:.2f}s after "
        f"the start, calls answered again {back and back.ended - serving:.2f}s after SERVING"
    )
    assert {outcome.code for outcome in outcomes} <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, (
        summary(outcomes)
    )
    before = [outcome for outcome in outcomes if outcome.ended < killing]
    assert len(before) >= 20 and all(outcome.ok for outcome in before), summary(before)
    down = load.started_between(killed, restarting)
    assert len(down) >= 10 and not any(outcome.ok for outcome in down), summary(down)
    assert max(outcome.elapsed for outcome in outcomes) <= WORKER_DEADLINE_S + 0.5, summary(outcomes)
    refused = [outcome for outcome in outcomes if not outcome.ok]
    assert all(address in outcome.details for outcome in refused), refused[:3]
    assert max(outcome.elapsed for outcome in refused) <= REFUSED_WITHIN_S, summary(refused)
    assert failures >= 1  # counted as the worker's failures
    assert back is not None, f"no call succeeded within {WORKER_RECOVERY_S:.1f}s of the worker SERVING"
    after = load.started_between(back.ended, float("inf"))
    assert len(after) >= 10 and all(outcome.ok for outcome in after), summary(after)


async def test_sigterm_finishes_in_flight_calls_then_exits(lifecycle_worker: Service) -> None:
    await asyncio.to_thread(started, lifecycle_worker)
    async with grpc.aio.insecure_channel(lifecycle_worker.address) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        calls = [
            asyncio.ensure_future(
                stub.Encode(
                    enc.EncodeRequest(inputs=texts(*[f"{LONG} {i}.{j}" for j in range(8)])), timeout=60
                )
            )
            for i in range(6)
        ]
        await asyncio.sleep(0.3)  # the calls are in the worker's queue and on its model
        assert not all(call.done() for call in calls), (
            "the calls finished before the test could stop the worker"
        )
        lifecycle_worker.signal(signal.SIGTERM)
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(not isinstance(r, BaseException) and len(r.embeddings) == 8 for r in results), results
    assert lifecycle_worker.wait(30) == 0


# --- an index shard killed, or frozen, under search load -------------------------------------------------

SHARD_TIMEOUT_S = 1.0  # GATEWAY_SHARD_TIMEOUT_S
SEARCH_DEADLINE_S = 3.0  # each load search's deadline: longer than the shard timeout
SPACE, DIM, ITEMS = "faults-16", 16, 200
# Shard SERVING -> whole answers again: the reconnect back-off (as for a worker) and one search.
SHARD_RECOVERY_S = RECONNECT_MAX_S * 1.2 + 2.0


@dataclass
class ShardPair:
    """Two index shards (fixed ports and data dirs: a restarted one is the same shard), a gateway in front
    of them (no workers, no cache: searches by vector), and the items indexed on them."""

    shards: list[Service]
    data_dirs: list[Path]
    gateway: Service
    log_dir: Path
    items: dict[str, np.ndarray] = field(default_factory=dict)

    def owner(self, item_id: str) -> Service:
        return self.shards[shard_of(item_id, len(self.shards))]

    def restart(self, number: int) -> Service:
        old = self.shards[number]
        self.shards[number] = index_shard(self.data_dirs[number], {}, self.log_dir, old.port, old.name)
        restart(self.shards[number])
        return self.shards[number]


@pytest.fixture(scope="module")
def shard_pair(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[ShardPair]:
    names = ["faults-shard-a", "faults-shard-b"]
    data_dirs = [tmp_path_factory.mktemp(name) for name in names]
    shards = [
        index_shard(data_dir, {}, log_dir, free_port(), name)
        for data_dir, name in zip(data_dirs, names, strict=True)
    ]
    settings = {
        "GATEWAY_SHARD_TIMEOUT_S": str(SHARD_TIMEOUT_S),
        "GATEWAY_WORKER_RECONNECT_MAX_S": str(RECONNECT_MAX_S),
    }
    try:
        for shard in shards:
            shard.start()
        for shard in shards:
            shard.wait_serving()
        service = gateway([], "", settings, log_dir, shards=[shard.address for shard in shards])
        with running(service), grpc.insecure_channel(service.address) as channel:
            rng = np.random.default_rng(7)
            matrix = rng.standard_normal((ITEMS, DIM)).astype(np.float32)
            pair = ShardPair(shards, data_dirs, service, log_dir)
            pair.items = {f"item-{n:03d}": matrix[n] / np.linalg.norm(matrix[n]) for n in range(ITEMS)}
            request = gw.UpsertRequest(
                space=SPACE, items=[gw.UpsertItem(id=i, vector=to_wire(v)) for i, v in pair.items.items()]
            )
            assert gateway_pb2_grpc.GatewayStub(channel).Upsert(request, timeout=30).upserted == ITEMS
            assert {pair.owner(item_id).name for item_id in pair.items} == set(names)
            yield pair
    finally:
        for shard in shards:  # the list a restart replaces into: the current processes
            shard.signal(signal.SIGCONT)  # in case a failed test left one frozen
            shard.stop()


def search(stub: gateway_pb2_grpc.GatewayStub, vector: np.ndarray, timeout: float) -> Any:
    return stub.Search(gw.SearchRequest(space=SPACE, vector=to_wire(vector), k=3), timeout=timeout)


def found_first(response: gw.SearchResponse, item_id: str) -> bool:
    return bool(response.hits) and response.hits[0].id == item_id and response.hits[0].score > 0.999


def stored(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        response = index_pb2_grpc.IndexStub(channel).Stats(idx.IndexStatsRequest(space=SPACE), timeout=5)
    return sum(int(held.count) for held in response.spaces if held.space == SPACE)


@asynccontextmanager
async def search_load(pair: ShardPair, deadline: float = SEARCH_DEADLINE_S) -> AsyncIterator[Load]:
    """Searches by the vectors of the indexed items; each outcome's result is (item id, response)."""
    ids = sorted(pair.items)
    async with grpc.aio.insecure_channel(pair.gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def call(caller: int, number: int) -> tuple[str, gw.SearchResponse]:
            item_id = ids[(caller * 37 + number * 11) % len(ids)]
            return item_id, await search(stub, pair.items[item_id], deadline)

        async with Load(call) as load:
            yield load


def whole(outcome: Outcome) -> bool:
    return outcome.ok and not outcome.result[1].partial


async def test_a_shard_killed_under_search_load_answers_partial_then_whole_with_nothing_lost(
    shard_pair: ShardPair,
) -> None:
    victim, survivor = shard_pair.shards[1], shard_pair.shards[0]
    on_victim = {item_id for item_id in shard_pair.items if shard_pair.owner(item_id) is victim}
    async with search_load(shard_pair) as load:
        await load.answered(24)  # steady load first
        killing = time.monotonic()
        await asyncio.to_thread(victim.kill)  # SIGKILL
        killed = time.monotonic()
        await asyncio.sleep(1.5)
        restarting = time.monotonic()
        restarted = await asyncio.to_thread(shard_pair.restart, 1)  # same port, same data dir
        serving = time.monotonic()
        back = await load.first(lambda outcome: outcome.started > killed and whole(outcome), SHARD_RECOVERY_S)
        if back is not None:  # and load after the recovery too
            await load.answered(12, after=back.ended)

    outcomes = load.outcomes
    partial = [outcome for outcome in outcomes if outcome.ok and outcome.result[1].partial]
    print(
        f"\nshard killed under search load: {summary(outcomes)}, {len(partial)} partial; restart: SERVING "
        f"{serving - restarting:.2f}s after the start, whole again {back and back.ended - serving:.2f}s after"
    )
    assert all(outcome.ok for outcome in outcomes), summary(outcomes)
    # Partial answers come as soon as the dead shard refuses, never later than the shard timeout.
    assert max(outcome.elapsed for outcome in outcomes) <= SHARD_TIMEOUT_S + 0.5, summary(outcomes)
    for outcome in partial:
        item_id, response = outcome.result
        assert list(response.missing_shards) == [victim.address]
        assert all(hit.shard == survivor.address for hit in response.hits)
        assert found_first(response, item_id) == (item_id not in on_victim), (item_id, response)
    for outcome in outcomes:
        if whole(outcome):
            assert found_first(outcome.result[1], outcome.result[0]), outcome.result
    before = [outcome for outcome in outcomes if outcome.ended < killing]
    assert len(before) >= 20 and all(whole(outcome) for outcome in before), summary(before)
    down = load.started_between(killed, restarting - MARGIN_S)
    assert len(down) >= 10 and not any(whole(outcome) for outcome in down), summary(down)
    assert back is not None, f"searches stayed partial {SHARD_RECOVERY_S:.1f}s after the shard was SERVING"
    after = load.started_between(back.ended, float("inf"))
    assert len(after) >= 10 and all(whole(outcome) for outcome in after), summary(after)

    # Nothing lost: every item of the restarted shard is back, found first by its own vector.
    assert stored(restarted.address) == len(on_victim)
    with grpc.insecure_channel(shard_pair.gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        futures = {
            item_id: stub.Search.future(
                gw.SearchRequest(space=SPACE, vector=to_wire(shard_pair.items[item_id]), k=1), timeout=10
            )
            for item_id in on_victim
        }
        lost = [item_id for item_id, future in futures.items() if not found_first(future.result(), item_id)]
    assert lost == [], f"{len(lost)} of {len(on_victim)} items of the restarted shard not found: {lost[:5]}"


async def frozen_searches(pair: ShardPair, deadline: float, count: int = 8) -> list[Outcome]:
    """`count` concurrent searches while shard 1 is frozen (SIGSTOP: connected, never answering)."""
    victim = pair.shards[1]
    ids = sorted(pair.items)
    async with grpc.aio.insecure_channel(pair.gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def one(item_id: str) -> Outcome:
            started = time.monotonic()
            try:
                response = await search(stub, pair.items[item_id], deadline)
                return Outcome(started, time.monotonic(), grpc.StatusCode.OK, result=(item_id, response))
            except grpc.aio.AioRpcError as error:
                return Outcome(started, time.monotonic(), error.code(), error.details() or "")

        await search(stub, pair.items[ids[0]], 10)  # the gateway's channels are up
        victim.signal(signal.SIGSTOP)
        try:
            outcomes = await asyncio.gather(*(one(ids[n * 7 % len(ids)]) for n in range(count)))
        finally:
            victim.signal(signal.SIGCONT)
        deadline_whole = time.monotonic() + SHARD_RECOVERY_S
        while (await search(stub, pair.items[ids[0]], 10)).partial:
            assert time.monotonic() < deadline_whole, "searches stayed partial after the shard was thawed"
            await asyncio.sleep(0.05)
    return list(outcomes)


async def test_a_frozen_shard_is_left_out_after_the_shard_timeout(shard_pair: ShardPair) -> None:
    """Caller's deadline longer than GATEWAY_SHARD_TIMEOUT_S: a partial answer after the shard timeout."""
    outcomes = await frozen_searches(shard_pair, SEARCH_DEADLINE_S)
    print(f"\nsearches with a frozen shard: {summary(outcomes)}")
    assert all(outcome.ok and outcome.result[1].partial for outcome in outcomes), summary(outcomes)
    assert all(
        list(outcome.result[1].missing_shards) == [shard_pair.shards[1].address] for outcome in outcomes
    )
    elapsed = [outcome.elapsed for outcome in outcomes]
    assert SHARD_TIMEOUT_S - 0.05 <= min(elapsed) and max(elapsed) <= SHARD_TIMEOUT_S + 1.0, elapsed


async def test_a_frozen_shard_is_left_out_within_a_callers_shorter_deadline(shard_pair: ShardPair) -> None:
    """Caller's deadline shorter than GATEWAY_SHARD_TIMEOUT_S: a partial answer within the caller's deadline
    (the shards get the caller's remaining time less a reserve for merging and answering)."""
    deadline = SHARD_TIMEOUT_S / 2
    outcomes = await frozen_searches(shard_pair, deadline, count=4)
    assert all(outcome.ok and outcome.result[1].partial for outcome in outcomes), summary(outcomes)


# --- a slow worker: deadlines honoured, no pile-up ------------------------------------------------------

SLOW_WORKER_TIMEOUT_S = 2.0  # GATEWAY_WORKER_TIMEOUT_S: the worker call's deadline when the caller set none
SLOW_ENCODE_S = 10.0  # how long the fake worker sleeps in Encode
BURST = 50
# The gateway must answer other calls promptly while its worker calls hang (normally 1-5 ms).
PROMPT_S = 1.0
# After its callers gave up, the fake worker's calls must end within this (cancelled: normally ms). Below
# what a gateway that did not pass cancellation on would take (the rest of SLOW_WORKER_TIMEOUT_S).
SETTLED_WITHIN_S = 1.0


@pytest.fixture(scope="module")
def slow_worker() -> Iterator[FakeEncoder]:
    with fake_encoder(delay_s=SLOW_ENCODE_S) as servicer:
        yield servicer


@pytest.fixture(scope="module")
def slow_gateway(slow_worker: FakeEncoder, log_dir: Path) -> Iterator[Service]:
    settings = {"GATEWAY_WORKER_TIMEOUT_S": str(SLOW_WORKER_TIMEOUT_S)}
    with running(gateway([slow_worker.address], "", settings, log_dir)) as service:
        yield service


@pytest.fixture
async def slow_stub(
    slow_gateway: Service, slow_worker: FakeEncoder
) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    assert slow_worker.settled(SETTLED_WITHIN_S)
    async with grpc.aio.insecure_channel(slow_gateway.address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


async def slow_call(stub: gateway_pb2_grpc.GatewayStub, timeout: float | None) -> Outcome:
    started = time.monotonic()
    try:
        await stub.Encode(enc.EncodeRequest(inputs=texts("take your time")), timeout=timeout)
        return Outcome(started, time.monotonic(), grpc.StatusCode.OK)
    except grpc.aio.AioRpcError as error:
        return Outcome(started, time.monotonic(), error.code(), error.details() or "")


async def test_a_slow_worker_call_ends_at_the_callers_deadline_and_is_cancelled(
    slow_stub: gateway_pb2_grpc.GatewayStub, slow_worker: FakeEncoder
) -> None:
    started, cancelled = slow_worker.started, slow_worker.cancelled
    outcome = await slow_call(slow_stub, 0.5)
    assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED, outcome
    assert 0.45 <= outcome.elapsed <= 0.5 + 1.0, outcome
    assert slow_worker.started == started + 1
    budget = slow_worker.budgets[-1]  # the deadline the gateway gave the worker: the caller's, not more
    assert budget is not None and budget <= 0.5 + 0.05, budget
    assert slow_worker.settled(SETTLED_WITHIN_S), f"{slow_worker.in_flight} worker calls still running"
    assert (slow_worker.cancelled, slow_worker.finished) == (cancelled + 1, 0)


async def test_without_a_deadline_the_gateway_gives_up_after_its_worker_timeout(
    slow_stub: gateway_pb2_grpc.GatewayStub, slow_worker: FakeEncoder
) -> None:
    # No deadline on the call; wait_for only keeps a broken gateway from holding the test for 10 s.
    outcome = await asyncio.wait_for(slow_call(slow_stub, None), SLOW_WORKER_TIMEOUT_S + 4)
    assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED, outcome
    assert slow_worker.address in outcome.details, outcome
    assert SLOW_WORKER_TIMEOUT_S - 0.05 <= outcome.elapsed <= SLOW_WORKER_TIMEOUT_S + 1.5, outcome
    budget = slow_worker.budgets[-1]
    assert budget is not None and SLOW_WORKER_TIMEOUT_S - 0.5 <= budget <= SLOW_WORKER_TIMEOUT_S + 0.05
    assert slow_worker.settled(SETTLED_WITHIN_S) and slow_worker.finished == 0


async def prompt_answers(channel: grpc.aio.Channel, until: asyncio.Event) -> list[float]:
    """Latencies of ListModels and Health calls to the gateway, one after another until `until` is set."""
    gateway_stub = gateway_pb2_grpc.GatewayStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    latencies: list[float] = []
    while not until.is_set():
        started = time.monotonic()
        models = await gateway_stub.ListModels(enc.ListModelsRequest(), timeout=5)
        assert [model.id for model in models.models] == ["fake-text"]
        status = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.02)
    return latencies


async def test_a_burst_against_a_slow_worker_does_not_pile_up(
    slow_gateway: Service, slow_stub: gateway_pb2_grpc.GatewayStub, slow_worker: FakeEncoder
) -> None:
    slow_worker.peak_in_flight = 0
    started, cancelled = slow_worker.started, slow_worker.cancelled
    async with grpc.aio.insecure_channel(slow_gateway.address) as channel:
        burst_over = asyncio.Event()
        probes = asyncio.create_task(prompt_answers(channel, burst_over))
        # Callers with a deadline: the gateway's worker calls end with it.
        outcomes = await asyncio.gather(*(slow_call(slow_stub, 0.5) for _ in range(BURST)))
        peak_with_deadlines = slow_worker.peak_in_flight
        settled = await asyncio.to_thread(slow_worker.settled, SETTLED_WITHIN_S)
        # Callers without a deadline that give up: the gateway must cancel its worker calls at once (else
        # they would run on until its SLOW_WORKER_TIMEOUT_S).
        quitters = [
            asyncio.ensure_future(slow_stub.Encode(enc.EncodeRequest(inputs=texts("quit"))))
            for _ in range(10)
        ]
        await eventually(lambda: slow_worker.in_flight >= len(quitters), 5)
        reached = slow_worker.in_flight
        cancelling = time.monotonic()
        for call in quitters:
            call.cancel()
        await asyncio.gather(*quitters, return_exceptions=True)
        settled_after_cancel = await asyncio.to_thread(slow_worker.settled, SETTLED_WITHIN_S)
        drained = time.monotonic() - cancelling
        await asyncio.sleep(0.2)  # and a few probes after the burst
        burst_over.set()
        latencies = await probes

    print(
        f"\nslow worker, {BURST} calls with a 0.5 s deadline: {summary(list(outcomes))}, worker peak in flight "
        f"{peak_with_deadlines}; 10 callers without a deadline cancelled: worker calls ended {drained:.3f}s "
        f"later; {len(latencies)} ListModels+Health probes, slowest {max(latencies):.3f}s"
    )
    assert all(outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED for outcome in outcomes), summary(
        list(outcomes)
    )
    assert max(outcome.elapsed for outcome in outcomes) <= 0.5 + 1.0, summary(list(outcomes))
    assert peak_with_deadlines >= BURST // 2, "the burst did not reach the worker at once"
    assert settled, f"{slow_worker.in_flight} worker calls still running {SETTLED_WITHIN_S}s after the burst"
    assert reached == len(quitters), f"only {reached} of the callers' calls reached the worker"
    assert settled_after_cancel, f"{slow_worker.in_flight} worker calls outlived their cancelled callers"
    assert slow_worker.finished == 0
    assert slow_worker.cancelled - cancelled == slow_worker.started - started == BURST + len(quitters)
    assert len(latencies) >= 5 and max(latencies) <= PROMPT_S, latencies
