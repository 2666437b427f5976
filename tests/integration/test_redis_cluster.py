"""The vector cache on a Redis Cluster (GATEWAY_REDIS_CLUSTER): a real local cluster of three
redis-servers (harness.processes.RedisCluster), used through VectorCache and through a gateway process in
front of a fake worker; one node killed under a gateway; a gateway told that a single Redis is a cluster."""

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2_grpc
from embeddings.v1 import types_pb2 as pb
from prometheus_client import REGISTRY

from harness.processes import RedisCluster, RedisServer, Service, gateway, running
from services.gateway.cache import RawVector, VectorCache, cache_key
from tests.fake_encoder import MODEL, FakeEncoder, fake_encoder
from tests.helpers import metric, texts, vectors

pytestmark = pytest.mark.integration

RETRY_S = 0.3  # GATEWAY_REDIS_RETRY_S
CLUSTER_SETTINGS = {"GATEWAY_REDIS_CLUSTER": "true", "GATEWAY_REDIS_RETRY_S": str(RETRY_S)}


@pytest.fixture(scope="module")
def redis_cluster(log_dir: Path) -> Iterator[RedisCluster]:
    with RedisCluster(log_dir=log_dir) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def worker() -> Iterator[FakeEncoder]:
    with fake_encoder() as started:
        yield started


def keys_on(node: RedisServer, pattern: str, password: str = "") -> set[str]:
    """The keys `node` itself holds (SCAN is per node: it follows no slot to another)."""
    with redis.Redis(port=node.port, password=password or None, decode_responses=True) as direct:
        return set(direct.scan_iter(match=pattern))


def key_of(text: str) -> str:
    return cache_key(MODEL.id, MODEL.version, pb.Input(text=text))


def in_process_errors() -> float:
    return sum(REGISTRY.get_sample_value("cache_errors_total", {"op": op}) or 0.0 for op in ("get", "put"))


def gateway_errors(service: Service) -> float:
    return sum(metric(service.metrics_port, "cache_errors_total", op=op) for op in ("get", "put"))


def encode(service: Service, sent: list[str]) -> enc.EncodeResponse:
    with grpc.insecure_channel(service.address) as channel:
        response = gateway_pb2_grpc.GatewayStub(channel).Encode(
            enc.EncodeRequest(inputs=texts(*sent)), timeout=10
        )
    assert response.model.id == MODEL.id
    return response


def cached(response: enc.EncodeResponse) -> list[bool]:
    return [embedding.cached for embedding in response.embeddings]


async def test_a_batch_spreads_over_every_node_and_comes_back_in_order_with_its_ttl(
    redis_cluster: RedisCluster,
) -> None:
    cache = VectorCache(redis_cluster.url, ttl_s=60, timeout_s=0.5, retry_s=RETRY_S, cluster=True)
    rng = np.random.default_rng(0)
    entries = {
        f"test:cluster:{n}": RawVector(rng.normal(size=8).astype(np.float32), n, n % 2 == 0)
        for n in range(64)
    }
    errors_before = in_process_errors()
    try:
        await cache.put_many(entries)
        asked = [*reversed(entries), "test:cluster:absent"]
        got = await cache.get_many(asked, "m", 8)
    finally:
        await cache.close()

    assert got[-1] is None
    for key, raw in zip(asked[:-1], got[:-1], strict=True):
        assert raw is not None
        np.testing.assert_array_equal(raw.values, entries[key].values)
        assert (raw.tokens, raw.truncated) == (entries[key].tokens, entries[key].truncated)
    held = [keys_on(node, "test:cluster:*") for node in redis_cluster.nodes]
    assert all(held), f"a node holds none of the keys: {[len(keys) for keys in held]}"
    assert sum(len(keys) for keys in held) == len(entries) and set().union(*held) == set(entries)
    for node, keys in zip(redis_cluster.nodes, held, strict=True):
        with redis.Redis(port=node.port) as direct:
            assert all(0 < direct.ttl(key) <= 60 for key in keys)
    assert in_process_errors() == errors_before


def test_a_gateway_on_the_cluster_serves_the_second_encode_from_it(
    redis_cluster: RedisCluster, worker: FakeEncoder, log_dir: Path
) -> None:
    sent = [f"cluster gateway text {n}" for n in range(24)]
    seed = redis_cluster.nodes[1].url  # any node will do
    with running(gateway([worker.address], seed, CLUSTER_SETTINGS, log_dir)) as service:
        hits_before = metric(service.metrics_port, "cache_hits_total", model=MODEL.id)
        first, second = encode(service, sent), encode(service, sent)
        assert cached(first) == [False] * len(sent)
        assert cached(second) == [True] * len(sent)
        np.testing.assert_array_equal(vectors(second), vectors(first))
        assert metric(service.metrics_port, "cache_hits_total", model=MODEL.id) == hits_before + len(sent)
        assert gateway_errors(service) == 0
    held = [keys_on(node, f"emb:v2:{MODEL.id}:*") for node in redis_cluster.nodes]
    assert {key_of(text) for text in sent} <= set().union(*held)
    assert all(held)


def test_a_node_killed_costs_the_cache_its_keys_and_fails_no_encode(
    worker: FakeEncoder, log_dir: Path
) -> None:
    """On a cluster of its own, which also requires a password: GATEWAY_REDIS_PASSWORD reaches every node."""
    sent = [f"text before the kill {n}" for n in range(12)]
    settings = {**CLUSTER_SETTINGS, "GATEWAY_REDIS_PASSWORD": "s3cret"}
    with (
        RedisCluster(log_dir=log_dir, password="s3cret") as cluster,
        running(gateway([worker.address], cluster.url, settings, log_dir)) as service,
    ):
        first = encode(service, sent)
        assert cached(encode(service, sent)) == [True] * len(sent)
        # the seed itself: the gateway found the other nodes through it, and asks them from now on
        victim, *survivors = cluster.nodes
        lost = keys_on(victim, f"emb:v2:{MODEL.id}:*", "s3cret")
        kept = set().union(*(keys_on(node, f"emb:v2:{MODEL.id}:*", "s3cret") for node in survivors))
        assert lost and kept
        victim.kill()  # SIGKILL

        again = encode(service, sent)  # a batch with keys on the dead node: answered without the cache
        np.testing.assert_array_equal(vectors(again), vectors(first))
        assert cached(again) == [False] * len(sent)
        errors = gateway_errors(service)
        assert errors >= 1

        # after GATEWAY_REDIS_RETRY_S the cache is tried again: what the surviving nodes hold is served
        on_survivor = next(text for text in sent if key_of(text) in kept)
        on_victim = next(text for text in sent if key_of(text) in lost)
        deadline = time.monotonic() + 10 * RETRY_S
        while cached(encode(service, [on_survivor])) != [True]:
            assert time.monotonic() < deadline, "a key on a surviving node was not served again"
            time.sleep(0.1)
        time.sleep(RETRY_S + 0.05)  # past any bypass: this lookup reaches the dead node, and fails
        alone = encode(service, [on_victim])
        assert cached(alone) == [False]
        np.testing.assert_array_equal(vectors(alone)[0], vectors(first)[sent.index(on_victim)])
        assert gateway_errors(service) > errors


def test_a_single_redis_taken_for_a_cluster_is_a_cache_that_is_down(
    redis_server: RedisServer, worker: FakeEncoder, tmp_path: Path
) -> None:
    sent = ["told it was a cluster"]
    with running(gateway([worker.address], redis_server.url, CLUSTER_SETTINGS, tmp_path)) as service:
        first, second = encode(service, sent), encode(service, sent)
        assert cached(first) == cached(second) == [False]
        np.testing.assert_array_equal(vectors(second), vectors(first))
        assert gateway_errors(service) >= 1
        assert "Cluster mode is not enabled on this node" in service.log_tail()


def test_a_cluster_url_with_a_database_other_than_0_runs_without_the_cache(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = VectorCache("redis://127.0.0.1:6379/1", ttl_s=60, timeout_s=0.5, retry_s=RETRY_S, cluster=True)
    assert not cache.enabled
    assert "cannot name a Redis Cluster node" in caplog.text
