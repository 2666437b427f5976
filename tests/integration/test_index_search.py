"""The index through the gateway, with real processes: two index shards behind a gateway in front of the
session's text and image workers. Cross-modal search over photos and captions; a shard killed -9 under
load (searches stay up, partial) and restarted from its data directory (refusing calls while it loads,
then whole, every acknowledged write back); bulk streaming; and bad input."""

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import gateway_pb2_grpc, index_pb2_grpc
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import types_pb2 as pb

from harness.processes import RedisServer, Service, free_port, gateway, health_status, index_shard, running
from services.common.vectors import to_wire
from services.gateway.sharding import shard_of
from services.index.records import Item, Op, encode
from services.index.wal import AppendLog
from tests.clip_checkpoint import TinyClip
from tests.image_files import photo

pytestmark = pytest.mark.integration

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "coins", "horse", "camera", "clock"]
CAPTIONS = {
    "cat": "a cat",
    "coffee": "a cup of coffee",
    "rocket": "a rocket on the launch pad",
    "astronaut": "an astronaut in a space suit",
    "horse": "a horse",
    "clock": "a clock on the wall",
}
MINILM_DIM = 384
# Small snapshot threshold: the kill test restarts a shard from a snapshot plus the log after it.
SHARD_ENV = {"INDEX_SNAPSHOT_EVERY_OPS": "200"}
# Quick reconnects: the gateway reaches a restarted shard while it is still loading.
GATEWAY_ENV = {
    "GATEWAY_MODEL_REFRESH_S": "1",
    "GATEWAY_SHARD_TIMEOUT_S": "2",
    "GATEWAY_WORKER_RECONNECT_MAX_S": "0.2",
}
MODELS = {"all-MiniLM-L6-v2", "imagenet-label-space", "efficientnet-lite0"}


@dataclass
class Cluster:
    """Two index shards (fixed ports and data dirs, so a killed one restarts as the same shard) and a gateway."""

    shards: list[Service]
    data_dirs: list[Path]
    gateway: Service
    log_dir: Path

    @property
    def addresses(self) -> list[str]:
        return [shard.address for shard in self.shards]

    def owner(self, item_id: str) -> str:
        return self.addresses[shard_of(item_id, len(self.shards))]

    def restart(self, number: int, wait: bool = True) -> Service:
        old = self.shards[number]
        shard = index_shard(self.data_dirs[number], SHARD_ENV, self.log_dir, port=old.port, name=old.name)
        self.shards[number] = shard
        shard.start()
        if wait:
            shard.wait_serving()
        return shard


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    log_dir: Path,
    text_service: Service,
    image_service: Service,
    redis_server: RedisServer,
    tiny_clip: TinyClip,
) -> Iterator[Cluster]:
    names = ["index-a", "index-b"]
    data_dirs = [tmp_path_factory.mktemp(name) for name in names]
    shards = [
        index_shard(data_dir, SHARD_ENV, log_dir, port=free_port(), name=name)
        for data_dir, name in zip(data_dirs, names, strict=True)
    ]
    try:
        for shard in shards:
            shard.start()
        for shard in shards:
            shard.wait_serving()
        service = gateway(
            [text_service.address, image_service.address],
            redis_server.url,
            GATEWAY_ENV,
            log_dir,
            shards=[shard.address for shard in shards],
        )
        with running(service), grpc.insecure_channel(service.address) as channel:
            wait_for_models(gateway_pb2_grpc.GatewayStub(channel), MODELS | {f"{tiny_clip.space}-text"})
            yield Cluster(shards, data_dirs, service, log_dir)
    finally:
        for shard in shards:  # the list the cluster restarts into: its current processes
            shard.signal(signal.SIGTERM)
        for shard in shards:
            shard.stop()


@pytest.fixture(scope="module")
def stub(cluster: Cluster) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(cluster.gateway.address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def wait_for_models(stub: gateway_pb2_grpc.GatewayStub, models: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        served = {model.id for model in stub.ListModels(enc.ListModelsRequest(), timeout=5).models}
        if models <= served:
            return
        assert time.monotonic() < deadline, f"the gateway serves {served}, not all of {models}"
        time.sleep(0.2)


def space_stats(address: str, space: str) -> idx.SpaceStats | None:
    with grpc.insecure_channel(address) as channel:
        response = index_pb2_grpc.IndexStub(channel).Stats(idx.IndexStatsRequest(space=space), timeout=5)
    return next((held for held in response.spaces if held.space == space), None)


def count(address: str, space: str) -> int:
    held = space_stats(address, space)
    return 0 if held is None else int(held.count)


def unit_vectors(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    matrix = rng.standard_normal((rows, dim)).astype(np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def vector_search(
    stub: gateway_pb2_grpc.GatewayStub, space: str, vector: np.ndarray, k: int = 1, timeout: float = 10
) -> gw.SearchResponse:
    return stub.Search(gw.SearchRequest(vector=to_wire(vector), space=space, k=k), timeout=timeout)


def top_hits(
    stub: gateway_pb2_grpc.GatewayStub, space: str, vectors: dict[str, np.ndarray], chunk: int = 32
) -> dict[str, gw.SearchResponse]:
    """For each id, the k=1 search by its own vector (calls in flight `chunk` at a time)."""
    found: dict[str, gw.SearchResponse] = {}
    ids = list(vectors)
    for start in range(0, len(ids), chunk):
        futures = {
            item_id: stub.Search.future(
                gw.SearchRequest(vector=to_wire(vectors[item_id]), space=space, k=1), timeout=20
            )
            for item_id in ids[start : start + chunk]
        }
        found.update({item_id: future.result() for item_id, future in futures.items()})
    return found


def is_top_hit(response: gw.SearchResponse, item_id: str) -> bool:
    return bool(response.hits) and response.hits[0].id == item_id and response.hits[0].score > 0.999


# --- cross-modal search over photos and captions --------------------------------------------------------


@pytest.fixture(scope="module")
def indexed(cluster: Cluster, stub: gateway_pb2_grpc.GatewayStub) -> dict[str, str]:
    """The photos and captions in space minilm (one Upsert, no space named: the space both kinds share),
    and the photos again, same ids, in the default image space; id -> payload."""
    payloads = {f"photo:{name}": json.dumps({"name": name, "source": "skimage"}) for name in PHOTOS}
    payloads |= {f"caption:{key}": json.dumps({"caption": text}) for key, text in CAPTIONS.items()}
    items = [
        gw.UpsertItem(
            id=f"photo:{name}",
            input=pb.Input(image=photo(name, "JPEG")),
            payload_json=payloads[f"photo:{name}"],
        )
        for name in PHOTOS
    ] + [
        gw.UpsertItem(id=f"caption:{key}", input=pb.Input(text=text), payload_json=payloads[f"caption:{key}"])
        for key, text in CAPTIONS.items()
    ]
    response = stub.Upsert(gw.UpsertRequest(items=items, request_id="photos-and-captions"), timeout=60)
    assert (response.upserted, response.request_id) == (len(items), "photos-and-captions")
    photos_only = [item for item in items if item.id.startswith("photo:")]
    assert stub.Upsert(gw.UpsertRequest(items=photos_only), timeout=60).upserted == len(PHOTOS)
    return payloads


def test_photos_and_captions_are_spread_over_both_shards(cluster: Cluster, indexed: dict[str, str]) -> None:
    minilm = [space_stats(address, "minilm") for address in cluster.addresses]
    images = [space_stats(address, "efficientnet-lite0") for address in cluster.addresses]
    assert all(held is not None and held.count > 0 and held.dimension == MINILM_DIM for held in minilm), (
        minilm
    )
    for address in cluster.addresses:  # each id where the hash puts it, and only there
        owned = {item_id for item_id in indexed if cluster.owner(item_id) == address}
        assert ids_held(address, "minilm", held_dimension(minilm)) & set(indexed) == owned
        photos = {item_id for item_id in owned if item_id.startswith("photo:")}
        assert ids_held(address, "efficientnet-lite0", held_dimension(images)) & set(indexed) == photos


def held_dimension(held: list[idx.SpaceStats | None]) -> int:
    return next(stats.dimension for stats in held if stats is not None)


def ids_held(address: str, space: str, dimension: int) -> set[str]:
    """Every id a shard holds in `space` (other tests add items to it too: only ids are compared)."""
    query = to_wire(np.full(dimension, dimension**-0.5, dtype=np.float32))
    with grpc.insecure_channel(address) as channel:
        response = index_pb2_grpc.IndexStub(channel).Search(
            idx.IndexSearchRequest(space=space, query=query, k=1000), timeout=10
        )
    assert len(response.hits) < 1000, "more items than one search returns: count them another way"
    return {hit.id for hit in response.hits}


@pytest.mark.parametrize(
    ("query", "expected"),
    [("a photo of a cat", "chelsea"), ("a cup of coffee", "coffee"), ("a rocket", "rocket")],
)
def test_a_text_query_finds_its_photo(
    cluster: Cluster, stub: gateway_pb2_grpc.GatewayStub, indexed: dict[str, str], query: str, expected: str
) -> None:
    response = stub.Search(
        gw.SearchRequest(
            input=pb.Input(text=query), k=5, filter=pb.SearchFilter(kinds=[pb.INPUT_KIND_IMAGE])
        ),
        timeout=30,
    )
    assert (response.space, response.query_model.id) == ("minilm", "all-MiniLM-L6-v2")
    assert (response.partial, list(response.missing_shards)) == (False, [])
    assert response.hits[0].id == f"photo:{expected}", [hit.id for hit in response.hits]
    assert len(response.hits) == 5
    scores = [hit.score for hit in response.hits]
    assert scores == sorted(scores, reverse=True)
    for hit in response.hits:
        assert hit.kind == pb.INPUT_KIND_IMAGE
        assert hit.payload_json == indexed[hit.id]
        assert hit.shard == cluster.owner(hit.id)


def test_an_image_query_finds_its_caption(
    cluster: Cluster, stub: gateway_pb2_grpc.GatewayStub, indexed: dict[str, str]
) -> None:
    response = stub.Search(
        gw.SearchRequest(
            input=pb.Input(image=photo("chelsea", "JPEG")),
            space="minilm",
            k=3,
            filter=pb.SearchFilter(kinds=[pb.INPUT_KIND_TEXT]),
        ),
        timeout=30,
    )
    assert (response.space, response.query_model.id) == ("minilm", "imagenet-label-space")
    assert response.hits[0].id == "caption:cat", [hit.id for hit in response.hits]
    assert json.loads(response.hits[0].payload_json) == {"caption": "a cat"}
    assert all(hit.kind == pb.INPUT_KIND_TEXT for hit in response.hits)
    assert response.hits[0].shard == cluster.owner("caption:cat")


def test_a_resized_photo_finds_the_original_in_the_image_space(
    stub: gateway_pb2_grpc.GatewayStub, indexed: dict[str, str]
) -> None:
    query = photo("coffee", "JPEG", size=(300, 200))  # resized and re-encoded
    assert query != photo("coffee", "JPEG")
    response = stub.Search(gw.SearchRequest(input=pb.Input(image=query), k=3), timeout=30)
    assert (response.space, response.query_model.id) == ("efficientnet-lite0", "efficientnet-lite0")
    assert response.hits[0].id == "photo:coffee", [hit.id for hit in response.hits]
    assert response.hits[0].score > 0.8, [(hit.id, hit.score) for hit in response.hits]
    assert response.hits[0].score > response.hits[1].score + 0.05, [
        (hit.id, hit.score) for hit in response.hits
    ]
    assert json.loads(response.hits[0].payload_json) == {"name": "coffee", "source": "skimage"}


def test_a_payload_filter_keeps_only_matching_items(
    stub: gateway_pb2_grpc.GatewayStub, indexed: dict[str, str]
) -> None:
    response = stub.Search(
        gw.SearchRequest(
            input=pb.Input(text="a photo of a cat"),
            k=10,
            filter=pb.SearchFilter(payload_equals={"name": "coffee"}),
        ),
        timeout=30,
    )
    assert [hit.id for hit in response.hits] == ["photo:coffee"]
    any_kind = pb.SearchFilter(kinds=[pb.INPUT_KIND_TEXT, pb.INPUT_KIND_IMAGE])
    everything = stub.Search(
        gw.SearchRequest(input=pb.Input(text="a photo of a cat"), k=100, filter=any_kind), timeout=30
    )
    assert {hit.id for hit in everything.hits} >= set(indexed)


# --- a shard killed -9 under load -----------------------------------------------------------------------


@dataclass
class Load:
    """Searches and upserts through the gateway from two threads, recorded with their times. Every other
    search is by the vector of `sentinel`, an item of the shard that is killed: a whole answer must have it
    first, a partial one must not have it."""

    stub: gateway_pb2_grpc.GatewayStub
    sentinel: tuple[str, np.ndarray]
    stop: threading.Event = field(default_factory=threading.Event)
    searches: list[tuple[float, float, bool, gw.SearchResponse | grpc.RpcError]] = field(default_factory=list)
    acked: dict[str, np.ndarray] = field(default_factory=dict)
    failed: dict[str, np.ndarray] = field(default_factory=dict)
    upsert_errors: list[grpc.RpcError] = field(default_factory=list)

    def search_loop(self) -> None:
        rng = np.random.default_rng(11)
        number = 0
        while not self.stop.is_set():
            by_sentinel = number % 2 == 0
            number += 1
            query = self.sentinel[1] if by_sentinel else unit_vectors(rng, 1, MINILM_DIM)[0]
            started = time.monotonic()
            try:
                result: gw.SearchResponse | grpc.RpcError = vector_search(self.stub, "minilm", query, k=10)
            except grpc.RpcError as error:
                result = error
            self.searches.append((started, time.monotonic(), by_sentinel, result))
            time.sleep(0.01)

    def upsert_loop(self) -> None:
        rng = np.random.default_rng(12)
        number = 0
        while not self.stop.is_set():
            batch = {f"load-{number + i}": row for i, row in enumerate(unit_vectors(rng, 4, MINILM_DIM))}
            number += len(batch)
            items = [gw.UpsertItem(id=item_id, vector=to_wire(row)) for item_id, row in batch.items()]
            try:
                self.stub.Upsert(gw.UpsertRequest(space="minilm", items=items), timeout=10)
                self.acked.update(batch)
            except grpc.RpcError as error:
                self.failed.update(batch)
                self.upsert_errors.append(error)
            time.sleep(0.02)


BALLAST = 150_000


def add_ballast(data_dir: Path, rows: int = BALLAST) -> None:
    """Give a stopped shard a last log segment of `rows` tiny items (space "ballast"), appended as its writer
    appends them: its next start replays them, which takes a second or so, a window to observe."""
    log = AppendLog(data_dir / "log")
    log.replay(log.segments()[0])  # cuts off a record the kill tore, as the shard would
    log.open(0)
    log.roll()
    vectors = unit_vectors(np.random.default_rng(9), rows, 4)
    log.write(
        b"".join(encode(Op("ballast", f"b{n}", Item(f"b{n}", vectors[n]))) for n in range(rows)), sync=True
    )
    log.close()


def probe_while_loading(shard: Service, item_id: str, vector: np.ndarray) -> list[str]:
    """Search `shard` directly for `item_id` from its start until it reports SERVING: what each call got."""
    outcomes: list[str] = []
    fast_reconnect = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.max_reconnect_backoff_ms", 50)]
    with grpc.insecure_channel(shard.address, options=fast_reconnect) as channel:
        index = index_pb2_grpc.IndexStub(channel)
        deadline = time.monotonic() + 60
        while health_status(shard.address, timeout=0.5) != "SERVING":
            assert shard.running() and time.monotonic() < deadline, shard.log_tail()
            request = idx.IndexSearchRequest(space="minilm", query=to_wire(vector), k=1)
            try:
                response = index.Search(request, timeout=2)
                outcomes.append("complete" if is_top_hit(response, item_id) else "INCOMPLETE")
            except grpc.RpcError as error:
                outcomes.append(f"{error.code().name}{' (loading)' if 'loading' in error.details() else ''}")
            time.sleep(0.01)
    return outcomes


def test_a_shard_killed_under_load_keeps_search_answering_and_comes_back_whole(
    cluster: Cluster, stub: gateway_pb2_grpc.GatewayStub
) -> None:
    victim, survivor = cluster.shards[1], cluster.shards[0]
    rng = np.random.default_rng(3)
    before = {address: count(address, "minilm") for address in cluster.addresses}

    # Items and acknowledged deletes from before the kill, on both shards.
    early = {f"early-{i}": row for i, row in enumerate(unit_vectors(rng, 40, MINILM_DIM))}
    items = [gw.UpsertItem(id=item_id, vector=to_wire(row)) for item_id, row in early.items()]
    assert stub.Upsert(gw.UpsertRequest(space="minilm", items=items), timeout=10).upserted == 40
    on_victim = [item_id for item_id in early if cluster.owner(item_id) == victim.address]
    doomed = on_victim[:5] + [item_id for item_id in early if cluster.owner(item_id) == survivor.address][:5]
    deleted = stub.Delete(gw.DeleteRequest(space="minilm", ids=doomed), timeout=10)
    assert (deleted.deleted, deleted.not_found) == (10, 0)
    kept = {item_id: row for item_id, row in early.items() if item_id not in doomed}
    sentinel = on_victim[-1]
    assert sentinel not in doomed

    load = Load(stub, (sentinel, early[sentinel]))
    threads = [threading.Thread(target=load.search_loop), threading.Thread(target=load.upsert_loop)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        acked_before_kill = len(load.acked)
        kill_started = time.monotonic()
        victim.kill()  # SIGKILL
        killed = time.monotonic()
        add_ballast(cluster.data_dirs[1])
        time.sleep(max(0.0, killed + 2.5 - time.monotonic()))
        restart_started = time.monotonic()
        restarted = cluster.restart(1, wait=False)  # same port, same data directory
        assert restarted.address == victim.address
        probes = probe_while_loading(restarted, sentinel, early[sentinel])
        up = time.monotonic()
        deadline = up + 15
        while vector_search(stub, "minilm", unit_vectors(rng, 1, MINILM_DIM)[0]).partial:
            assert time.monotonic() < deadline, "searches stayed partial after the shard came back"
            time.sleep(0.05)
        whole = time.monotonic()
        time.sleep(0.5)  # load after the recovery too
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(30)

    failures = [result for *_, result in load.searches if isinstance(result, grpc.RpcError)]
    assert failures == [], [(error.code(), error.details()) for error in failures[:3]]
    answered = [
        (start, end, by_sentinel, result)
        for start, end, by_sentinel, result in load.searches
        if isinstance(result, gw.SearchResponse)
    ]
    assert all(not result.partial for _, end, _, result in answered if end < kill_started)
    down = [result for start, end, _, result in answered if start > killed and end < restart_started]
    assert len(down) >= 10, f"only {len(down)} searches ran while the shard was down"
    assert all(result.partial for result in down)
    for _, _, by_sentinel, result in answered:
        if result.partial:
            assert list(result.missing_shards) == [victim.address]
            assert result.hits and all(hit.shard == survivor.address for hit in result.hits)
            assert sentinel not in [hit.id for hit in result.hits]
        elif by_sentinel:  # a whole answer is complete: the victim's items are in it
            assert is_top_hit(result, sentinel), [(hit.id, hit.score) for hit in result.hits]
    assert any(not result.partial for start, _, _, result in answered if start > whole)
    partial = sum(result.partial for *_, result in answered)
    print(
        f"\n{len(load.searches)} searches, 0 failed, {partial} partial ({len(down)} while down); "
        f"upserts: {len(load.acked)} ids acknowledged, {len(load.failed)} failed; restart: serving after "
        f"{up - restart_started:.2f}s ({len(probes)} direct probes while loading), whole again "
        f"{whole - up:.2f}s after"
    )

    # While it loads its data a shard answers UNAVAILABLE, never an answer without the items still loading.
    assert set(probes) <= {"UNAVAILABLE", "UNAVAILABLE (loading)", "complete"}, Counter(probes)
    assert "UNAVAILABLE (loading)" in probes, Counter(probes)
    assert count(restarted.address, "ballast") == BALLAST

    # Upserts touching the dead shard failed as UNAVAILABLE naming it; the others were acknowledged.
    assert acked_before_kill > 0 and load.failed and load.upsert_errors
    for error in load.upsert_errors:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert victim.address in error.details()

    # Every acknowledged id is back, on the shard that owns it; failed requests may have been applied in
    # part (the items on the live shard, or durable on the victim just before the kill) but nothing else.
    found = top_hits(stub, "minilm", {**load.acked, **load.failed, **kept})
    missing = [item_id for item_id in [*load.acked, *kept] if not is_top_hit(found[item_id], item_id)]
    assert missing == [], f"{len(missing)} acknowledged ids lost, e.g. {missing[:5]}"
    present = {item_id for item_id, response in found.items() if is_top_hit(response, item_id)}
    for item_id in present:
        assert found[item_id].hits[0].shard == cluster.owner(item_id)
        assert not found[item_id].partial
    for address in cluster.addresses:
        expected = before[address] + sum(cluster.owner(item_id) == address for item_id in present)
        assert count(address, "minilm") == expected, address

    # Deletes acknowledged before the kill are still deleted after the restart.
    for item_id in doomed:
        response = vector_search(stub, "minilm", early[item_id], k=5)
        assert item_id not in [hit.id for hit in response.hits]
        assert not response.partial


# --- bulk ---------------------------------------------------------------------------------------------


def test_bulk_upsert_stream_answers_each_request_in_order_and_everything_is_findable(
    cluster: Cluster, stub: gateway_pb2_grpc.GatewayStub
) -> None:
    rng = np.random.default_rng(5)
    vectors = unit_vectors(rng, 3000, 32)
    ids = [f"bulk-{i:05d}" for i in range(len(vectors))]

    def requests() -> Iterator[gw.UpsertRequest]:
        for start in range(0, len(ids), 100):
            yield gw.UpsertRequest(
                space="bulk-32",
                request_id=f"request-{start // 100}",
                items=[
                    gw.UpsertItem(
                        id=ids[i], vector=to_wire(vectors[i]), payload_json=json.dumps({"n": str(i)})
                    )
                    for i in range(start, start + 100)
                ],
            )

    started = time.monotonic()
    responses = list(stub.UpsertStream(requests(), timeout=60))
    took = time.monotonic() - started
    assert [response.request_id for response in responses] == [f"request-{n}" for n in range(30)]
    assert [response.upserted for response in responses] == [100] * 30
    stats = [space_stats(address, "bulk-32") for address in cluster.addresses]
    assert all(held is not None and held.dimension == 32 and held.count > 0 for held in stats), stats
    assert sum(held.count for held in stats if held) == 3000

    found = top_hits(stub, "bulk-32", dict(zip(ids, vectors, strict=True)), chunk=64)
    lost = [item_id for item_id in ids if not is_top_hit(found[item_id], item_id)]
    assert lost == [], f"{len(lost)} of 3000 not found first by their own vector, e.g. {lost[:5]}"
    assert all(json.loads(found[i].hits[0].payload_json) == {"n": str(n)} for n, i in enumerate(ids))
    print(
        f"\nUpsertStream of 3000 items: {took:.2f}s; 3000 searches: {time.monotonic() - started - took:.2f}s"
    )


# --- bad input ------------------------------------------------------------------------------------------

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def vec(values: list[float] | np.ndarray) -> pb.Vector:
    return to_wire(np.asarray(values, dtype=np.float32))


def minilm_vector(seed: int = 0) -> np.ndarray:
    return unit_vectors(np.random.default_rng(seed), 1, MINILM_DIM)[0]


def with_value(value: float) -> pb.Vector:
    row = minilm_vector()
    row[7] = value
    return vec(row)


BAD_SEARCHES = [
    (
        "k=0",
        gw.SearchRequest(vector=vec(minilm_vector()), space="minilm", k=0),
        "k=0 is out of range; use 1..1000",
    ),
    (
        "k=1001",
        gw.SearchRequest(vector=vec(minilm_vector()), space="minilm", k=1001),
        "k=1001 is out of range",
    ),
    (
        "unknown space",
        gw.SearchRequest(vector=vec(minilm_vector()), space="nowhere", k=3),
        "'nowhere' is unknown",
    ),
    ("vector, no space", gw.SearchRequest(vector=vec(minilm_vector()), k=3), "needs `space`"),
    ("NaN", gw.SearchRequest(vector=with_value(float("nan")), space="minilm", k=3), "NaN or infinite"),
    ("inf", gw.SearchRequest(vector=with_value(float("inf")), space="minilm", k=3), "NaN or infinite"),
    ("zero vector", gw.SearchRequest(vector=vec(np.zeros(MINILM_DIM)), space="minilm", k=3), "all zeros"),
    (
        "wrong dimension",
        gw.SearchRequest(vector=vec(np.ones(10)), space="minilm", k=3),
        "vector has 10 dimensions but space 'minilm' holds 384-dimensional vectors",
    ),
    ("empty query", gw.SearchRequest(space="minilm", k=3), "the query is empty"),
    (
        "text in an image-only space",
        gw.SearchRequest(input=pb.Input(text="a cat"), space="efficientnet-lite0", k=3),
        "a model for text inputs in space 'efficientnet-lite0' is not served here",
    ),
    (
        "unknown kind in the filter",
        gw.SearchRequest(
            vector=vec(minilm_vector()), space="minilm", k=3, filter=pb.SearchFilter(kinds=[99])
        ),
        "filter.kinds has unknown InputKind values [99]",
    ),
]


@pytest.mark.parametrize(
    ("request_", "fragment"), [case[1:] for case in BAD_SEARCHES], ids=[c[0] for c in BAD_SEARCHES]
)
def test_a_bad_search_is_invalid_argument_and_the_next_one_works(
    stub: gateway_pb2_grpc.GatewayStub, indexed: dict[str, str], request_: gw.SearchRequest, fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Search(request_, timeout=10)
    assert caught.value.code() == INVALID, caught.value.details()
    assert fragment in caught.value.details()
    response = stub.Search(gw.SearchRequest(input=pb.Input(text="a cup of coffee"), k=1), timeout=10)
    assert response.hits[0].id in {"photo:coffee", "caption:coffee"}


def item(item_id: str = "bad-1", payload: str = "") -> gw.UpsertItem:
    return gw.UpsertItem(id=item_id, vector=vec(minilm_vector(1)), payload_json=payload)


BAD_UPSERTS = [
    (
        "payload not JSON",
        gw.UpsertRequest(space="minilm", items=[item(payload="{nope")]),
        "items[0].payload_json is not valid JSON",
    ),
    (
        "payload an array",
        gw.UpsertRequest(space="minilm", items=[item(), item("bad-2", "[1, 2]")]),
        "items[1].payload_json must be a JSON object, not list",
    ),
    (
        "payload too big",
        gw.UpsertRequest(space="minilm", items=[item(payload=json.dumps({"x": "y" * 16_400}))]),
        "the limit is 16384",
    ),
    ("empty id", gw.UpsertRequest(space="minilm", items=[item("")]), "items[0].id is empty"),
    ("no items", gw.UpsertRequest(space="minilm"), "items is empty"),
    (
        "no content",
        gw.UpsertRequest(space="minilm", items=[gw.UpsertItem(id="bad-3")]),
        "items[0] has neither",
    ),
    ("vectors, no space", gw.UpsertRequest(items=[item()]), "vector items need `space`"),
    (
        "wrong dimension",
        gw.UpsertRequest(space="minilm", items=[gw.UpsertItem(id="bad-4", vector=vec(np.ones(10)))]),
        "items[0].vector has 10 dimensions but space 'minilm' holds 384-dimensional vectors",
    ),
    (
        "NaN",
        gw.UpsertRequest(space="minilm", items=[gw.UpsertItem(id="bad-5", vector=with_value(float("nan")))]),
        "items[0].vector holds NaN or infinite values",
    ),
]


@pytest.mark.parametrize(
    ("request_", "fragment"), [case[1:] for case in BAD_UPSERTS], ids=[c[0] for c in BAD_UPSERTS]
)
def test_a_bad_upsert_is_invalid_argument_and_stores_nothing(
    stub: gateway_pb2_grpc.GatewayStub, indexed: dict[str, str], request_: gw.UpsertRequest, fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Upsert(request_, timeout=10)
    assert caught.value.code() == INVALID, caught.value.details()
    assert fragment in caught.value.details()
    response = vector_search(stub, "minilm", minilm_vector(1), k=1)
    assert not (response.hits and response.hits[0].id.startswith("bad-") and response.hits[0].score > 0.999)


def test_duplicate_ids_in_one_upsert_last_one_wins(stub: gateway_pb2_grpc.GatewayStub) -> None:
    first, last = unit_vectors(np.random.default_rng(21), 2, MINILM_DIM)
    items = [
        gw.UpsertItem(id="twice", vector=to_wire(first), payload_json='{"version": "first"}'),
        gw.UpsertItem(id="twice", vector=to_wire(last), payload_json='{"version": "last"}'),
    ]
    assert stub.Upsert(gw.UpsertRequest(space="minilm", items=items), timeout=10).upserted == 2
    response = vector_search(stub, "minilm", last, k=5)
    assert is_top_hit(response, "twice")
    assert json.loads(response.hits[0].payload_json) == {"version": "last"}
    by_first = vector_search(stub, "minilm", first, k=1000)
    assert [hit.id for hit in by_first.hits].count("twice") == 1
    assert next(hit.score for hit in by_first.hits if hit.id == "twice") < 0.5  # the last vector's score


def test_a_known_space_with_nothing_indexed_answers_no_hits(
    stub: gateway_pb2_grpc.GatewayStub, tiny_clip: TinyClip, cluster: Cluster
) -> None:
    assert all(space_stats(address, tiny_clip.space) is None for address in cluster.addresses)
    query = unit_vectors(np.random.default_rng(0), 1, 32)[0]
    response = vector_search(stub, tiny_clip.space, query, k=10)
    assert (list(response.hits), response.space, response.partial) == ([], tiny_clip.space, False)
    with pytest.raises(grpc.RpcError) as caught:  # its dimension is the model's, even with nothing indexed
        vector_search(stub, tiny_clip.space, np.ones(MINILM_DIM, dtype=np.float32))
    assert caught.value.code() == INVALID
    assert "holds 32-dimensional vectors" in caught.value.details()


def test_deleting_unknown_ids_counts_them_as_not_found(stub: gateway_pb2_grpc.GatewayStub) -> None:
    row = minilm_vector(30)
    stub.Upsert(
        gw.UpsertRequest(space="minilm", items=[gw.UpsertItem(id="known", vector=to_wire(row))]), timeout=10
    )
    response = stub.Delete(
        gw.DeleteRequest(space="minilm", ids=["known", "unknown-1", "unknown-2"]), timeout=10
    )
    assert (response.deleted, response.not_found) == (1, 2)
    again = stub.Delete(gw.DeleteRequest(space="minilm", ids=["known", "unknown-1"]), timeout=10)
    assert (again.deleted, again.not_found) == (0, 2)
    assert "known" not in [hit.id for hit in vector_search(stub, "minilm", row, k=5).hits]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Delete(gw.DeleteRequest(ids=["known"]), timeout=10)
    assert caught.value.code() == INVALID and "space is empty" in caught.value.details()


def test_vectors_of_two_dimensions_cannot_start_a_new_space_across_shards(
    cluster: Cluster, stub: gateway_pb2_grpc.GatewayStub
) -> None:
    """One request into a new space, its 8-d item owned by one shard and its 16-d item by the other: the
    gateway refuses it, rather than leaving each shard with a different dimension for the space."""
    candidates = [f"mixed-{n}" for n in range(20)]
    first = next(i for i in candidates if cluster.owner(i) == cluster.addresses[0])
    second = next(i for i in candidates if cluster.owner(i) == cluster.addresses[1])
    rng = np.random.default_rng(40)
    items = [
        gw.UpsertItem(id=first, vector=to_wire(unit_vectors(rng, 1, 8)[0])),
        gw.UpsertItem(id=second, vector=to_wire(unit_vectors(rng, 1, 16)[0])),
    ]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Upsert(gw.UpsertRequest(space="mixed", items=items), timeout=10)
    assert caught.value.code() == INVALID, caught.value.details()
    assert "items[1].vector has 16 dimensions" in caught.value.details()
    assert all(space_stats(address, "mixed") is None for address in cluster.addresses)

    items[0] = gw.UpsertItem(id=first, vector=to_wire(unit_vectors(rng, 1, 16)[0]))
    assert stub.Upsert(gw.UpsertRequest(space="mixed", items=items), timeout=10).upserted == 2
    assert [space_stats(address, "mixed").dimension for address in cluster.addresses] == [16, 16]
