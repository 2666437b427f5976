"""Faults with real processes: Redis dies under the gateway, a worker dies, is overloaded, or is stopped."""

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc, gateway_pb2_grpc

from harness.processes import RedisServer, Service, gateway, health_status, running, text_worker
from tests.helpers import metric, texts

pytestmark = pytest.mark.integration

LONG = "The quick brown fox jumps over the lazy dog while the band plays on. " * 12  # ~170 tokens


@pytest.fixture(scope="module")
def own_redis(log_dir: Path) -> Iterator[RedisServer]:
    with running(RedisServer(log_dir=log_dir)) as server:
        yield server


@pytest.fixture(scope="module")
def cached_gateway(log_dir: Path, text_service: Service, own_redis: RedisServer) -> Iterator[Service]:
    settings = {"GATEWAY_REDIS_TIMEOUT_S": "0.2", "GATEWAY_REDIS_RETRY_S": "0.5"}
    with running(gateway([text_service.address], own_redis.url, settings, log_dir)) as service:
        yield service


def test_redis_killed_mid_test_encodes_still_succeed_and_the_cache_comes_back(
    cached_gateway: Service, own_redis: RedisServer, log_dir: Path
) -> None:
    with grpc.insecure_channel(cached_gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        stub.Encode(enc.EncodeRequest(inputs=texts("before the outage")))
        assert stub.Encode(enc.EncodeRequest(inputs=texts("before the outage"))).embeddings[0].cached

        own_redis.kill()
        for i in range(20):
            response = stub.Encode(
                enc.EncodeRequest(inputs=texts("before the outage", f"during {i}")), timeout=5
            )
            assert [e.cached for e in response.embeddings] == [False, False]
        assert metric(cached_gateway.metrics_port, "cache_errors_total", op="get") >= 1

        with running(RedisServer(port=own_redis.port, log_dir=log_dir)):  # empty, as after a crash
            time.sleep(0.6)  # past GATEWAY_REDIS_RETRY_S
            stub.Encode(enc.EncodeRequest(inputs=texts("after the outage")))
            assert stub.Encode(enc.EncodeRequest(inputs=texts("after the outage"))).embeddings[0].cached


@pytest.fixture(scope="module")
def lifecycle_worker(log_dir: Path) -> Iterator[Service]:
    """A worker of its own (started by the first test, not here), with a small queue."""
    worker = text_worker({"TEXT_MAX_QUEUE": "64", "TEXT_SHUTDOWN_GRACE_S": "20"}, log_dir)
    yield worker
    worker.kill()


def test_health_is_serving_only_after_the_model_loaded(lifecycle_worker: Service) -> None:
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


def test_gateway_answers_unavailable_while_its_worker_is_down_then_recovers(
    lifecycle_worker: Service, log_dir: Path
) -> None:
    settings = {"GATEWAY_WORKER_RECONNECT_MAX_S": "0.5"}
    with (
        running(gateway([lifecycle_worker.address], "", settings, log_dir)) as service,
        grpc.insecure_channel(service.address) as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        assert stub.Encode(enc.EncodeRequest(inputs=texts("up")), timeout=10).embeddings
        lifecycle_worker.kill()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Encode(enc.EncodeRequest(inputs=texts("down")), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert lifecycle_worker.address in caught.value.details()

        lifecycle_worker.start()  # same port
        lifecycle_worker.wait_serving()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert stub.Encode(enc.EncodeRequest(inputs=texts("back")), timeout=10).embeddings
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                time.sleep(0.2)


async def test_sigterm_finishes_in_flight_calls_then_exits(lifecycle_worker: Service) -> None:
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
