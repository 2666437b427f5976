"""Shard discovery from DNS SRV records (a Kubernetes headless Service), against a real tiny DNS server on
127.0.0.1: shard numbers from the targets' ordinals, ignored and duplicate targets, a DNS that lists
nothing yet, fails or goes silent (the last known addresses are kept); and a ShardSet over discovered shards
(real gRPC to in-process fake index shards): undiscovered shards are missing by name, writes they own are
refused whole, a changed address is followed. Plus the settings that go with it."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import grpc
import numpy as np
import pytest
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import index_pb2_grpc as idx_grpc
from embeddings.v1 import types_pb2 as pb
from pydantic import ValidationError

from harness.processes import free_port
from services.common.errors import Unavailable
from services.common.vectors import to_wire
from services.gateway.channels import BackendChannels
from services.gateway.discovery import DiscoveryError, SrvDiscovery, ordinal, parse_nameserver
from services.gateway.settings import GatewaySettings
from services.gateway.sharding import ShardSet, shard_of
from tests.dns_server import DnsServer, Srv, dns_server

SRV = "_grpc._tcp.index.test.svc.cluster.local."
SRV_SHOWN = SRV.rstrip(".")
SPACE = "s"


def pod(number: int, port: int = 50071) -> Srv:
    return Srv(f"index-{number}.index.test.svc.cluster.local.", port)


def address(number: int, port: int = 50071) -> str:
    return f"index-{number}.index.test.svc.cluster.local:{port}"


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with dns_server() as server:
        yield server


def discovery(dns: DnsServer, count: int = 3, timeout_s: float = 0.5) -> SrvDiscovery:
    return SrvDiscovery(SRV, count, dns.address, timeout_s)


# --- resolution -----------------------------------------------------------------------------------------


def test_ordinals_come_from_the_targets_first_label() -> None:
    assert ordinal("index-3.index.ns.svc.cluster.local.") == 3
    assert ordinal("index-3") == 3
    assert ordinal("my-index-12.my-index.ns.svc.cluster.local") == 12
    assert ordinal("index.index-3.ns.svc.cluster.local.") is None  # only the first label counts
    assert ordinal("index-x.ns.") is None
    # Pods outside a StatefulSet are named by their IP: no ordinal there.
    assert ordinal("10-0-0-7.index.ns.svc.cluster.local.") is None
    assert ordinal("fd00-10-244-1--7.index.ns.svc.cluster.local.") is None
    assert ordinal("") is None


def test_nameservers_parse_as_ip_and_port() -> None:
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("10.0.0.10") == ("10.0.0.10", 53)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    assert parse_nameserver("::1") == ("::1", 53)
    for bad in ("dns.local:53", "127.0.0.1:0", "127.0.0.1:x", "[::1]x"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)


async def test_srv_targets_map_to_shard_numbers_by_ordinal(dns: DnsServer) -> None:
    dns.set(SRV, [pod(2), pod(0, 50099), pod(1)])  # DNS order means nothing
    assert await discovery(dns).resolve() == {0: address(0, 50099), 1: address(1), 2: address(2)}


async def test_targets_without_an_ordinal_or_past_the_count_are_ignored_with_a_warning(
    dns: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    dns.set(
        SRV,
        [
            pod(0),
            Srv("index.index.test.svc.cluster.local.", 50071),  # no ordinal
            pod(3),  # count is 3: shards 0..2
            Srv(".", 50071),  # "no service here"
            pod(1),
        ],
    )
    found = discovery(dns)
    with caplog.at_level(logging.WARNING, logger="discovery"):
        assert await found.resolve() == {0: address(0), 1: address(1)}
        first = [record.getMessage() for record in caplog.records]
        assert await found.resolve() == {0: address(0), 1: address(1)}
    assert len(first) == 3, first
    assert any("index.index.test.svc.cluster.local:50071" in m and "no ordinal" in m for m in first)
    assert any("index-3.index" in m and "GATEWAY_INDEX_SHARD_COUNT=3" in m for m in first)
    assert len(caplog.records) == 3, "each distinct warning is logged once, not at every resolution"


async def test_a_duplicate_ordinal_keeps_one_target_whatever_the_dns_order(
    dns: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    twins = [Srv("index-1.b.test.", 7001), Srv("index-1.a.test.", 7002), pod(0)]
    chosen = set()
    with caplog.at_level(logging.WARNING, logger="discovery"):
        for records in (twins, twins[::-1]):
            dns.set(SRV, records)
            found = await discovery(dns).resolve()
            chosen.add(found[1])
    assert chosen == {"index-1.a.test:7002"}  # the same priority: by name
    assert "shard 1 is listed at index-1.a.test:7002, index-1.b.test:7001" in caplog.text
    # A lower priority value wins over the name.
    dns.set(SRV, [Srv("index-1.b.test.", 7001, priority=0), Srv("index-1.a.test.", 7002, priority=10)])
    assert (await discovery(dns).resolve())[1] == "index-1.b.test:7001"


async def test_a_name_with_no_records_or_no_name_is_no_shards(dns: DnsServer) -> None:
    assert await discovery(dns).resolve() == {}  # NXDOMAIN: the Service has no pod yet
    dns.set(SRV, [])
    assert await discovery(dns).resolve() == {}  # the name, no records


async def test_a_dns_that_fails_or_stays_silent_raises_discovery_error(dns: DnsServer) -> None:
    dns.set(SRV, [pod(0)])
    dns.mode = "servfail"
    with pytest.raises(DiscoveryError):
        await discovery(dns).resolve()
    dns.mode = "silent"
    started = time.monotonic()
    with pytest.raises(DiscoveryError, match="Timeout"):
        await discovery(dns, timeout_s=0.3).resolve()
    assert time.monotonic() - started < 2.0, "the resolution must give up within its timeout"


def test_discovery_needs_a_count() -> None:
    with pytest.raises(ValueError, match="count"):
        SrvDiscovery(SRV, 0)


def test_an_undiscovered_shard_is_named_after_its_expected_pod() -> None:
    found = SrvDiscovery(SRV, 3)
    assert found.undiscovered(2) == f"shard 2 (not discovered yet: index-2 is not in {SRV_SHOWN})"


# --- settings -------------------------------------------------------------------------------------------


def test_srv_without_a_shard_count_is_a_settings_error() -> None:
    with pytest.raises(ValidationError, match="GATEWAY_INDEX_SHARDS_SRV needs GATEWAY_INDEX_SHARD_COUNT > 0"):
        GatewaySettings(index_shards_srv=SRV)
    settings = GatewaySettings(index_shards_srv=SRV, index_shard_count=4, dns_nameserver="127.0.0.1:5353")
    assert (settings.index_shard_count, settings.shard_discovery_s) == (4, 10.0)


def test_settings_refuse_a_bad_nameserver_or_a_count_at_odds_with_the_static_list() -> None:
    with pytest.raises(ValidationError, match="must be an IP address"):
        GatewaySettings(index_shards_srv=SRV, index_shard_count=2, dns_nameserver="kube-dns:53")
    with pytest.raises(ValidationError, match="GATEWAY_INDEX_SHARDS lists 2"):
        GatewaySettings(index_shards="a:1,b:2", index_shard_count=3)
    with pytest.raises(ValidationError):
        GatewaySettings(index_shards_srv=SRV, index_shard_count=-1)
    with pytest.raises(ValidationError):
        GatewaySettings(index_shards_srv=SRV, index_shard_count=2, shard_discovery_s=0)
    assert GatewaySettings(index_shards="a:1,b:2", index_shard_count=2).index_shard_count == 2


# --- a ShardSet over discovered shards, with real gRPC ------------------------------------------------------


class FakeShard(idx_grpc.IndexServicer):
    """An Index shard that keeps ids (no vectors) and answers every search with one hit per id it holds."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.calls = 0
        self.address = ""

    async def Upsert(self, request: idx.IndexUpsertRequest, context: object) -> idx.IndexUpsertResponse:
        self.calls += 1
        self.ids.update(item.id for item in request.items)
        return idx.IndexUpsertResponse(upserted=len(request.items))

    async def Delete(self, request: idx.IndexDeleteRequest, context: object) -> idx.IndexDeleteResponse:
        self.calls += 1
        held = self.ids & set(request.ids)
        self.ids -= held
        return idx.IndexDeleteResponse(deleted=len(held), not_found=len(request.ids) - len(held))

    async def Search(self, request: idx.IndexSearchRequest, context: object) -> idx.IndexSearchResponse:
        self.calls += 1
        return idx.IndexSearchResponse(hits=[pb.Hit(id=i, score=0.5) for i in sorted(self.ids)])

    async def Stats(self, request: idx.IndexStatsRequest, context: object) -> idx.IndexStatsResponse:
        return idx.IndexStatsResponse(spaces=[idx.SpaceStats(space=SPACE, dimension=4, count=len(self.ids))])


@asynccontextmanager
async def fake_shards(count: int) -> AsyncIterator[list[FakeShard]]:
    servers, shards = [], []
    for _ in range(count):
        server, shard = grpc.aio.server(), FakeShard()
        idx_grpc.add_IndexServicer_to_server(shard, server)
        shard.address = str(server.add_insecure_port("127.0.0.1:0"))  # the port
        await server.start()
        servers.append(server)
        shards.append(shard)
    try:
        yield shards
    finally:
        await asyncio.gather(*(server.stop(None) for server in servers))


def on_localhost(number: int, shard: FakeShard) -> Srv:
    """A pod-like SRV target that gRPC reaches on loopback: `index-<n>.localhost.` (RFC 6761: names under
    localhost. are loopback; gRPC's c-ares resolver answers them without asking DNS)."""
    return Srv(f"index-{number}.localhost.", int(shard.address))


def reached(number: int, shard: FakeShard) -> str:
    return f"index-{number}.localhost:{shard.address}"


CHANNELS = BackendChannels(max_message_bytes=4 << 20, reconnect_max_s=0.2)
QUERY = idx.IndexSearchRequest(space=SPACE, query=to_wire(np.ones(4, dtype=np.float32) / 2), k=100)


def items(ids: list[str]) -> list[idx.IndexItem]:
    return [idx.IndexItem(id=i, vector=to_wire(np.ones(4, dtype=np.float32) / 2)) for i in ids]


def ids_owned_by(number: int, count: int, how_many: int) -> list[str]:
    return [i for i in (f"item-{n}" for n in range(1000)) if shard_of(i, count) == number][:how_many]


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, "not within the timeout"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_undiscovered_shards_are_missing_by_name_until_dns_lists_them(dns: DnsServer) -> None:
    async with fake_shards(2) as (zero, one):
        shards = ShardSet([], CHANNELS, discovery(dns, count=2))
        await shards.start(refresh_s=60, discovery_s=60)  # DNS knows no shard yet: starts all the same
        try:
            with pytest.raises(Unavailable, match="no index shard is discovered yet: shard 0"):
                await shards.search(QUERY, timeout=2)
            with pytest.raises(Unavailable, match=r"index shard \d \(not discovered yet"):
                await shards.upsert(SPACE, items(["a"]), "r1", timeout=2, epoch=0)

            dns.set(SRV, [on_localhost(0, zero)])
            await shards.discover()
            assert shards.held == {SPACE: (4, 0)}, "a newly discovered shard's spaces are learned at once"
            merged = await shards.search(QUERY, timeout=2)
            assert merged.missing == [f"shard 1 (not discovered yet: index-1 is not in {SRV_SHOWN})"]

            # A write with an id owned by the undiscovered shard is refused whole: no shard got any of it.
            mine, theirs = ids_owned_by(0, 2, 3), ids_owned_by(1, 2, 1)
            before = zero.calls
            with pytest.raises(Unavailable) as refused:
                await shards.upsert(SPACE, items(mine + theirs), "r2", timeout=2, epoch=0)
            assert refused.value.message == (
                f"index shard 1 (not discovered yet: index-1 is not in {SRV_SHOWN}) did not complete Upsert: "
                "it owns items of this request and has no address yet; nothing was applied; the request is "
                "safe to retry as it is"
            )
            with pytest.raises(Unavailable, match="did not complete Delete"):
                await shards.delete(SPACE, theirs, timeout=2, epoch=0)
            assert zero.calls == before and zero.ids == set()
            await shards.upsert(SPACE, items(mine), "r3", timeout=2, epoch=0)  # all on shard 0: fine
            assert zero.ids == set(mine)

            dns.set(SRV, [on_localhost(1, one), on_localhost(0, zero)])
            await shards.discover()
            await shards.upsert(SPACE, items(mine + theirs), "r4", timeout=2, epoch=0)
            assert (zero.ids, one.ids) == (set(mine), set(theirs))
            merged = await shards.search(QUERY, timeout=2)
            assert merged.missing == []
            assert {hit.id: hit.shard for hit in merged.hits} == {
                **{i: reached(0, zero) for i in mine},
                **{i: reached(1, one) for i in theirs},
            }
            assert await shards.delete(SPACE, [*theirs, "nope"], timeout=2, epoch=0) == (1, 1)
        finally:
            await shards.close()


async def test_rediscovery_follows_a_moved_shard_and_keeps_addresses_through_dns_trouble(
    dns: DnsServer,
) -> None:
    async with fake_shards(3) as (zero, one, moved):
        dns.set(SRV, [on_localhost(0, zero), on_localhost(1, one)])
        shards = ShardSet([], CHANNELS, discovery(dns, count=2, timeout_s=0.2))
        await shards.start(refresh_s=60, discovery_s=0.1)
        try:
            assert [s.address if s else None for s in shards.shards] == [reached(0, zero), reached(1, one)]
            old = shards.shards[1]
            assert old is not None

            # Shard 1 comes back elsewhere (a new port): the discovery loop follows it.
            dns.set(SRV, [on_localhost(0, zero), on_localhost(1, moved)])
            took = await eventually(lambda: shards.shards[1] is not old)
            current = shards.shards[1]
            assert current is not None and current.address == reached(1, moved)
            theirs = ids_owned_by(1, 2, 2)
            await shards.upsert(SPACE, items(theirs), "r", timeout=2, epoch=0)
            assert (one.ids, moved.ids) == (set(), set(theirs))
            await eventually(
                lambda: old.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
            )  # the old address's channel is closed
            print(f"\nmoved shard followed in {took:.2f}s (discovery every 0.1s)")

            # DNS fails, then goes silent, then lists shard 0 only: the last known addresses are kept.
            known = [s.address if s else None for s in shards.shards]
            for trouble in ("servfail", "silent"):
                dns.mode = trouble
                queries = dns.queries
                await eventually(lambda q=queries: dns.queries > q + 1)
                assert [s.address if s else None for s in shards.shards] == known
                assert (await shards.search(QUERY, timeout=2)).missing == []
            dns.mode = "answer"
            dns.set(SRV, [on_localhost(0, zero)])
            queries = dns.queries
            await eventually(lambda: dns.queries > queries + 1)
            assert [s.address if s else None for s in shards.shards] == known
            merged = await shards.search(QUERY, timeout=2)
            assert merged.missing == [] and {hit.id for hit in merged.hits} == set(theirs)
        finally:
            await shards.close()


async def test_a_gateway_starts_while_dns_is_down_and_finds_its_shards_once_it_answers(
    dns: DnsServer,
) -> None:
    async with fake_shards(1) as (zero,):
        dns.set(SRV, [on_localhost(0, zero)])
        dns.mode = "silent"
        shards = ShardSet([], CHANNELS, discovery(dns, count=1, timeout_s=0.3))
        started = time.monotonic()
        await shards.start(refresh_s=60, discovery_s=0.1)
        try:
            assert time.monotonic() - started < 1.5, "start must not wait on DNS past the resolver's timeout"
            assert shards.shards == [None]
            with pytest.raises(Unavailable, match="no index shard is discovered yet"):
                await shards.search(QUERY, timeout=1)
            dns.mode = "answer"
            await eventually(lambda: shards.shards[0] is not None)
            assert (await shards.search(QUERY, timeout=2)).missing == []
        finally:
            await shards.close()


async def test_static_shards_are_named_by_address_as_before() -> None:
    async with fake_shards(1) as (alive,):
        down = f"127.0.0.1:{free_port()}"  # nothing listens there
        shards = ShardSet([f"127.0.0.1:{alive.address}", down], CHANNELS)
        await shards.start(refresh_s=60)
        try:
            merged = await shards.search(QUERY, timeout=1)
            assert merged.missing == [down]
            owned_by_down = ids_owned_by(1, 2, 1)
            with pytest.raises(Unavailable, match=f"index shard {down} did not complete Upsert"):
                await shards.upsert(SPACE, items(owned_by_down), "r", timeout=1, epoch=0)
        finally:
            await shards.close()
