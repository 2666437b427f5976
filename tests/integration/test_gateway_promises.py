"""README promises about the gateway, checked on one gateway process in front of fakes that record what
reaches them (tests/fake_encoder.py): an encoder worker that records every input and how many calls it holds
at once, a user-item worker whose Fit never ends, a Redis that requires a password (given in the URL only)
and two index shards that acknowledge every upsert but fail every search. The gateway requires a token, for health checks too."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import gateway_pb2_grpc
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import index_pb2_grpc as idx_grpc
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import recommender_pb2_grpc as rec_grpc
from embeddings.v1 import types_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from harness.processes import RedisServer, Service, gateway, running
from services.common.vectors import from_wire, to_wire
from services.gateway.cache import cache_key
from tests.fake_encoder import MODEL, FakeEncoder, fake_encoder, fake_vector
from tests.helpers import metric

pytestmark = pytest.mark.integration

TOKEN = "promises-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
REDIS_PASSWORD = "url-only-s3cret"
STREAM_WINDOW = 3  # GATEWAY_STREAM_WINDOW (the default is 8)
FIT_TIMEOUT_S = 2.0  # GATEWAY_FIT_TIMEOUT_S (GATEWAY_WORKER_TIMEOUT_S is 60 s: a Fit must not get that)
WORKER_TIMEOUT_S = 60.0
WORKER_DELAY_S = 0.2  # each Encode takes this long: a stream's requests overlap at the worker
# gRPC sends a deadline as a timeout rounded up; the server turns it back into a deadline on its own clock.
DEADLINE_SLACK_S = 0.1


class HangingFit(rec_grpc.RecommenderServicer):
    """A user-item worker whose Fit never ends by itself; records each Fit's deadline and its end."""

    def __init__(self) -> None:
        self.budgets: list[float | None] = []
        self.ended = 0

    async def Fit(
        self, request_iterator: AsyncIterator[rec.FitRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rec.FitProgress]:
        self.budgets.append(context.time_remaining())
        try:
            await asyncio.Event().wait()
        finally:
            self.ended += 1
        yield rec.FitProgress()


@pytest.fixture(scope="module")
def fit_worker() -> HangingFit:
    return HangingFit()


@pytest.fixture(scope="module")
def worker(fit_worker: HangingFit) -> Iterator[FakeEncoder]:
    def register(server: grpc.aio.Server) -> None:
        rec_grpc.add_RecommenderServicer_to_server(fit_worker, server)

    with fake_encoder(delay_s=WORKER_DELAY_S, register=register) as started:
        yield started


class FakeShard(idx_grpc.IndexServicer):
    """An index shard that knows every space as 4-dimensional, acknowledges every Upsert (storing nothing)
    and fails every Search."""

    async def ClaimSpace(
        self, request: idx.ClaimSpaceRequest, context: grpc.aio.ServicerContext
    ) -> idx.SpaceClaim:
        return idx.SpaceClaim(space=request.space, dimension=4, epoch=0)

    async def LookupSpace(
        self, request: idx.LookupSpaceRequest, context: grpc.aio.ServicerContext
    ) -> idx.SpaceClaim:
        return idx.SpaceClaim(space=request.space, dimension=4, epoch=0)

    async def Stats(
        self, request: idx.IndexStatsRequest, context: grpc.aio.ServicerContext
    ) -> idx.IndexStatsResponse:
        return idx.IndexStatsResponse()

    async def Upsert(
        self, request: idx.IndexUpsertRequest, context: grpc.aio.ServicerContext
    ) -> idx.IndexUpsertResponse:
        return idx.IndexUpsertResponse(upserted=len(request.items), request_id=request.request_id)

    async def Search(
        self, request: idx.IndexSearchRequest, context: grpc.aio.ServicerContext
    ) -> idx.IndexSearchResponse:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "this fake shard fails every search")
        raise AssertionError("abort raises")


@pytest.fixture(scope="module")
def fake_shards() -> Iterator[list[str]]:
    """The addresses of two FakeShards."""

    def register(server: grpc.aio.Server) -> None:
        idx_grpc.add_IndexServicer_to_server(FakeShard(), server)

    with fake_encoder(register=register) as first, fake_encoder(register=register) as second:
        yield [first.address, second.address]


@pytest.fixture(scope="module")
def locked_redis(log_dir: Path) -> Iterator[RedisServer]:
    with running(RedisServer(log_dir=log_dir, password=REDIS_PASSWORD)) as server:
        yield server


def serving_with_token(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), metadata=AUTH, timeout=1
            )
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(scope="module")
def service(
    worker: FakeEncoder, locked_redis: RedisServer, fake_shards: list[str], log_dir: Path
) -> Iterator[Service]:
    settings = {
        "GATEWAY_AUTH_TOKENS": TOKEN,
        "GATEWAY_AUTH_HEALTH": "true",
        "GATEWAY_STREAM_WINDOW": str(STREAM_WINDOW),
        "GATEWAY_FIT_TIMEOUT_S": str(FIT_TIMEOUT_S),
        "GATEWAY_WORKER_TIMEOUT_S": str(WORKER_TIMEOUT_S),
        "GATEWAY_DEFAULT_TEXT_MODEL": MODEL.id,
    }
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{locked_redis.port}/0"  # no GATEWAY_REDIS_PASSWORD
    started = gateway([worker.address], url, settings, log_dir, shards=fake_shards, useritem=worker.address)
    started.name = "gateway-promises"
    started.start()
    try:
        # The harness's readiness check sends no token, which this gateway refuses: wait with one.
        deadline = time.monotonic() + 120
        while not serving_with_token(started.address):
            assert started.running(), started.log_tail()
            assert time.monotonic() < deadline, f"not SERVING within 120 s:\n{started.log_tail()}"
            time.sleep(0.1)
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def stub(service: Service) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(service.address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def fresh_texts(*names: str) -> dict[str, str]:
    """Texts no earlier call encoded (so not in the cache), by short name."""
    run = uuid.uuid4().hex
    return {name: f"{name} {run}" for name in names}


def encode(stub: gateway_pb2_grpc.GatewayStub, texts: list[str]) -> enc.EncodeResponse:
    request = enc.EncodeRequest(model=MODEL.id, inputs=[pb.Input(text=text) for text in texts])
    response: enc.EncodeResponse = stub.Encode(request, metadata=AUTH, timeout=30)
    return response


def assert_vectors_of(response: enc.EncodeResponse, texts: list[str]) -> None:
    """Each answer is the fake model's vector of its own input, normalised (the default)."""
    assert len(response.embeddings) == len(texts)
    for embedding, text in zip(response.embeddings, texts, strict=True):
        expected = fake_vector(text) / np.linalg.norm(fake_vector(text))
        np.testing.assert_allclose(from_wire(embedding.vector), expected, rtol=1e-6, err_msg=text)


# --- the cache ------------------------------------------------------------------------------------------


def test_only_each_distinct_miss_is_sent_to_the_worker(
    stub: gateway_pb2_grpc.GatewayStub, worker: FakeEncoder
) -> None:
    t = fresh_texts("a", "b", "c", "d")
    first = [t["a"], t["b"], t["a"], t["c"], t["b"]]
    before = len(worker.texts)
    response = encode(stub, first)
    assert sorted(worker.texts[before:]) == sorted([t["a"], t["b"], t["c"]])
    assert_vectors_of(response, first)
    assert [e.cached for e in response.embeddings] == [False] * 5

    second = [t["a"], t["d"], t["d"], t["c"]]
    before = len(worker.texts)
    response = encode(stub, second)
    assert worker.texts[before:] == [t["d"]]
    assert_vectors_of(response, second)
    assert [e.cached for e in response.embeddings] == [True, False, False, True]


def test_a_password_in_the_redis_url_is_used(
    stub: gateway_pb2_grpc.GatewayStub, worker: FakeEncoder, locked_redis: RedisServer
) -> None:
    """The gateway has the password only in GATEWAY_REDIS_URL: its entries are in the Redis that requires
    it, and a second call is answered from them without the worker."""
    text = fresh_texts("cached")["cached"]
    assert [e.cached for e in encode(stub, [text]).embeddings] == [False]
    key = cache_key(MODEL.id, MODEL.version, pb.Input(text=text))
    with redis.Redis(port=locked_redis.port, password=REDIS_PASSWORD) as direct:
        assert direct.exists(key) == 1
    before = len(worker.texts)
    assert [e.cached for e in encode(stub, [text]).embeddings] == [True]
    assert len(worker.texts) == before


# --- streams, Fit ----------------------------------------------------------------------------------------


def encode_stream(
    stub: gateway_pb2_grpc.GatewayStub, texts: list[str]
) -> tuple[list[str], list[enc.EncodeResponse]]:
    requests = [
        enc.EncodeRequest(model=MODEL.id, inputs=[pb.Input(text=text)], request_id=str(n))
        for n, text in enumerate(texts)
    ]
    responses = list(stub.EncodeStream(iter(requests), metadata=AUTH, timeout=60))
    for response, text in zip(responses, texts, strict=True):
        assert_vectors_of(response, [text])
    return [response.request_id for response in responses], responses


def upsert_stream(
    stub: gateway_pb2_grpc.GatewayStub, texts: list[str]
) -> tuple[list[str], list[gw.UpsertResponse]]:
    requests = [
        gw.UpsertRequest(
            model=MODEL.id, items=[gw.UpsertItem(id=f"w{n}", input=pb.Input(text=text))], request_id=str(n)
        )
        for n, text in enumerate(texts)
    ]
    responses = list(stub.UpsertStream(iter(requests), metadata=AUTH, timeout=60))
    assert [response.upserted for response in responses] == [1] * len(texts)
    return [response.request_id for response in responses], responses


@pytest.mark.parametrize("stream", [encode_stream, upsert_stream], ids=["EncodeStream", "UpsertStream"])
def test_a_stream_has_at_most_the_stream_window_in_flight(
    stub: gateway_pb2_grpc.GatewayStub, worker: FakeEncoder, stream: Any
) -> None:
    texts = list(fresh_texts(*(f"s{n}" for n in range(4 * STREAM_WINDOW))).values())
    assert worker.settled(30)
    worker.peak_in_flight = 0
    request_ids, _ = stream(stub, texts)
    assert request_ids == [str(n) for n in range(len(texts))]
    # Each request is one call to the worker, which takes WORKER_DELAY_S: a gateway handling more than the
    # window at once would have more of them at the worker together.
    assert 1 <= worker.peak_in_flight <= STREAM_WINDOW, worker.peak_in_flight


def test_a_fit_whose_caller_set_no_deadline_gets_gateway_fit_timeout(
    stub: gateway_pb2_grpc.GatewayStub, fit_worker: HangingFit
) -> None:
    ended = fit_worker.ended
    progress = stub.Fit(iter([rec.FitRequest(model="promises")]), metadata=AUTH)  # no timeout
    with pytest.raises(grpc.RpcError) as failed:
        list(progress)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, failed.value
    budget = fit_worker.budgets[-1]
    assert budget is not None and 0 < budget <= FIT_TIMEOUT_S + DEADLINE_SLACK_S, budget
    deadline = time.monotonic() + 30
    while fit_worker.ended == ended and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fit_worker.ended == ended + 1, "the worker's Fit was not ended at the deadline"


# --- the index ------------------------------------------------------------------------------------------


def test_search_is_unavailable_when_no_shard_answers(
    stub: gateway_pb2_grpc.GatewayStub, service: Service, fake_shards: list[str]
) -> None:
    failures = [
        metric(service.metrics_port, "shard_failures_total", shard=shard, method="Search")
        for shard in fake_shards
    ]
    vector = to_wire(np.ones(4, dtype=np.float32) / 2)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Search(gw.SearchRequest(space="promises", vector=vector, k=3), metadata=AUTH, timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert all(shard in (refused.value.details() or "") for shard in fake_shards), refused.value.details()
    after = [
        metric(service.metrics_port, "shard_failures_total", shard=shard, method="Search")
        for shard in fake_shards
    ]
    assert all(later == earlier + 1 for earlier, later in zip(failures, after, strict=True)), (
        failures,
        after,
    )


# --- health behind the token, metrics -----------------------------------------------------------------


def test_health_and_reflection_need_the_token_with_gateway_auth_health(service: Service) -> None:
    with grpc.insecure_channel(service.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = health.Check(health_pb2.HealthCheckRequest(), metadata=AUTH, timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as refused:
            list(reflection.ServerReflectionInfo(iter([listing]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = list(reflection.ServerReflectionInfo(iter([listing]), metadata=AUTH, timeout=10))
        names = {entry.name for entry in listed[0].list_services_response.service}
        assert "embeddings.v1.Gateway" in names


def test_encode_counts_its_latency_and_cache_misses(
    stub: gateway_pb2_grpc.GatewayStub, service: Service
) -> None:
    port = service.metrics_port
    t = fresh_texts("m1", "m2")
    latency_before = metric(port, "rpc_latency_seconds_count", service="gateway", method="Encode")
    misses_before = metric(port, "cache_misses_total", model=MODEL.id)
    hits_before = metric(port, "cache_hits_total", model=MODEL.id)
    encode(stub, [t["m1"], t["m2"]])
    encode(stub, [t["m1"]])
    assert metric(port, "rpc_latency_seconds_count", service="gateway", method="Encode") == latency_before + 2
    assert metric(port, "cache_misses_total", model=MODEL.id) == misses_before + 2
    assert metric(port, "cache_hits_total", model=MODEL.id) == hits_before + 1
