"""A gateway that discovers its index shards from DNS SRV records, as from a Kubernetes headless Service:
two real index shards, a real DNS server (tests/dns_server.py) the gateway is pointed at with
GATEWAY_DNS_NAMESERVER, and real gRPC from the gateway to the SRV targets.

The targets are `index-0.localhost.` and `index-1.localhost.` (each with its shard's port): pod-like names
whose ordinals give the shard numbers, and which gRPC reaches on loopback because names under `localhost.`
are loopback (RFC 6761), answered by gRPC's c-ares resolver itself (this machine's getaddrinfo does not
know them, so the gateway is pinned to that resolver with GRPC_DNS_RESOLVER=ares).

DNS lists only shard 0 at first: searches are partial naming shard 1, and writes it owns are refused;
once DNS lists shard 1 too, searches are whole within a few discovery periods. Items then land on the
shards exactly as a gateway with the static GATEWAY_INDEX_SHARDS list (same order) puts them."""

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import gateway_pb2_grpc, index_pb2_grpc
from embeddings.v1 import index_pb2 as idx

from harness.processes import Service, gateway, health_status, index_shard, running
from services.common.vectors import to_wire
from services.gateway.sharding import shard_of
from tests.dns_server import Srv, dns_server

pytestmark = pytest.mark.integration

SRV = "_grpc._tcp.index.discovery-test.svc.cluster.local."
DISCOVERY_S = 0.2
DIM, ITEMS = 8, 400
GATEWAY_ENV = {
    "GATEWAY_SHARD_TIMEOUT_S": "2",
    "GATEWAY_WORKER_RECONNECT_MAX_S": "0.2",
    "GATEWAY_SHUTDOWN_GRACE_S": "2",
    # gRPC's c-ares resolver answers `*.localhost` with loopback (RFC 6761); pinned, as the native one may not.
    "GRPC_DNS_RESOLVER": "ares",
}


def target(number: int, shard: Service) -> Srv:
    return Srv(f"index-{number}.localhost.", shard.port)


def reached(number: int, shard: Service) -> str:
    """The address the gateway calls shard `number` at (and names it by in hits and missing_shards)."""
    return f"index-{number}.localhost:{shard.port}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[list[Service]]:
    started = [
        index_shard(tmp_path_factory.mktemp(f"discovered-{n}"), {}, log_dir, name=f"discovered-shard-{n}")
        for n in range(2)
    ]
    try:
        for shard in started:
            shard.start()
        for shard in started:
            shard.wait_serving()
        yield started
    finally:
        for shard in started:
            shard.signal(signal.SIGTERM)
        for shard in started:
            shard.stop()


def stored(shard: Service, space: str) -> int:
    with grpc.insecure_channel(shard.address) as channel:
        response = index_pb2_grpc.IndexStub(channel).Stats(idx.IndexStatsRequest(space=space), timeout=5)
    return sum(int(held.count) for held in response.spaces if held.space == space)


def upsert(stub: gateway_pb2_grpc.GatewayStub, space: str, vectors: dict[str, np.ndarray]) -> None:
    ids = sorted(vectors)
    for start in range(0, len(ids), 200):
        batch = ids[start : start + 200]
        request = gw.UpsertRequest(
            space=space, items=[gw.UpsertItem(id=i, vector=to_wire(vectors[i])) for i in batch]
        )
        assert stub.Upsert(request, timeout=10).upserted == len(batch)


def search(stub: gateway_pb2_grpc.GatewayStub, space: str, vector: np.ndarray) -> gw.SearchResponse:
    return stub.Search(gw.SearchRequest(space=space, vector=to_wire(vector), k=1), timeout=10)


def test_a_gateway_finds_its_shards_in_dns_srv_and_places_items_as_the_static_list_does(
    shards: list[Service], log_dir: Path
) -> None:
    # The premise: gRPC reaches a shard at its pod-like name under localhost.
    assert health_status(reached(0, shards[0]), timeout=5) == "SERVING", (
        "gRPC cannot reach index-0.localhost on loopback here (is GRPC_DNS_RESOLVER=native set?)"
    )
    rng = np.random.default_rng(11)
    matrix = rng.standard_normal((ITEMS, DIM)).astype(np.float32)
    vectors = {f"doc-{n:04d}": row / np.linalg.norm(row) for n, row in enumerate(matrix)}
    owner = {item_id: shard_of(item_id, 2) for item_id in vectors}
    first = {i: v for i, v in vectors.items() if owner[i] == 0}
    one_of_shard_1 = next(i for i in sorted(vectors) if owner[i] == 1)

    with dns_server({SRV: [target(0, shards[0])]}) as dns:  # shard 1 not in DNS yet
        discovered = gateway(
            [],
            "",
            {
                **GATEWAY_ENV,
                "GATEWAY_INDEX_SHARDS_SRV": SRV,
                "GATEWAY_INDEX_SHARD_COUNT": "2",
                "GATEWAY_DNS_NAMESERVER": dns.address,
                "GATEWAY_SHARD_DISCOVERY_S": str(DISCOVERY_S),
            },
            log_dir,
        )
        discovered.name = "discovering-gateway"
        static = gateway([], "", GATEWAY_ENV, log_dir, shards=[shard.address for shard in shards])
        static.name = "static-gateway"
        with (
            running(discovered),
            running(static),
            grpc.insecure_channel(discovered.address) as channel,
            grpc.insecure_channel(static.address) as static_channel,
        ):
            stub = gateway_pb2_grpc.GatewayStub(channel)

            # Only shard 0 known: its items are stored; searches are partial, naming shard 1 and why.
            upsert(stub, "found", first)
            response = search(stub, "found", next(iter(first.values())))
            assert response.partial
            assert list(response.missing_shards) == [
                f"shard 1 (not discovered yet: index-1 is not in {SRV.rstrip('.')})"
            ]
            assert response.hits[0].shard == reached(0, shards[0])
            with pytest.raises(grpc.RpcError) as refused:
                upsert(stub, "found", {one_of_shard_1: vectors[one_of_shard_1]})
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "index shard 1 (not discovered yet: index-1 is not in" in (refused.value.details() or "")

            # DNS lists shard 1 too: searches become whole within a few discovery periods.
            dns.set(SRV, [target(1, shards[1]), target(0, shards[0])])
            started = time.monotonic()
            while search(stub, "found", next(iter(first.values()))).partial:
                assert time.monotonic() - started < 10, "searches stayed partial after DNS listed shard 1"
                time.sleep(0.05)
            whole_after = time.monotonic() - started

            # Every item, through each gateway into a space of its own: the same shards, the same counts.
            upsert(stub, "found", vectors)
            upsert(gateway_pb2_grpc.GatewayStub(static_channel), "listed", vectors)
            expected = [sum(1 for n in owner.values() if n == shard) for shard in range(2)]
            found = [stored(shard, "found") for shard in shards]
            listed = [stored(shard, "listed") for shard in shards]
            print(
                f"\nSRV discovery: whole {whole_after:.2f}s after DNS listed shard 1 (every {DISCOVERY_S}s); "
                f"{ITEMS} items, per shard: discovered {found}, static {listed}, jump hash {expected}"
            )
            assert found == listed == expected and min(expected) > 0

            # Search finds each item first, on the shard that owns it.
            for item_id in sorted(vectors)[::20]:
                response = search(stub, "found", vectors[item_id])
                assert not response.partial and list(response.missing_shards) == []
                assert response.hits[0].id == item_id and response.hits[0].score > 0.999
                assert response.hits[0].shard == reached(owner[item_id], shards[owner[item_id]])
