"""The index API, the same on every index backend: each test runs once against the built-in shards and once
against Milvus (Milvus Lite 2.5's C++ engine as a server), through two real gateways in front of each, and
checks only what the Gateway API shows, so that the two backends cannot drift apart.

Upsert (replace by id, duplicate ids, bulk streams), Delete, Search (kinds and payload filters, payload
values and ids built to break a filter expression, k up to the limit, empty results), vector-only spaces
(names that are no valid Milvus collection name), one dimension per space (also when two gateways race to
create a space), DropSpace, and bad input.
"""

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import gateway_pb2_grpc
from embeddings.v1 import types_pb2 as pb

from harness.processes import MilvusLite, Process, Service, gateway, index_shard
from services.common.vectors import to_wire
from tests.clip_checkpoint import TinyClip

pytestmark = pytest.mark.integration

BACKENDS = ["shards", "milvus"]
GATEWAY_ENV = {"GATEWAY_MODEL_REFRESH_S": "1", "GATEWAY_SHUTDOWN_GRACE_S": "2"}
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MINILM_DIM = 384


@dataclass
class Index:
    """Two gateways in front of one index (`backend`: two shards, or one Milvus)."""

    backend: str
    fronts: list[Service]
    stubs: list[gateway_pb2_grpc.GatewayStub]

    @property
    def stub(self) -> gateway_pb2_grpc.GatewayStub:
        return self.stubs[0]


@pytest.fixture(scope="module", params=BACKENDS)
def index(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    log_dir: Path,
    text_service: Service,
) -> Iterator[Index]:
    backend: str = request.param
    data = tmp_path_factory.mktemp(f"conformance-{backend}")
    stores: list[Process] = []
    if backend == "shards":
        shards = [
            index_shard(data / f"shard-{n}", {}, log_dir, name=f"conformance-shard-{n}") for n in range(2)
        ]
        stores += shards
        env = {**GATEWAY_ENV, "GATEWAY_INDEX_SHARDS": ",".join(shard.address for shard in shards)}
    else:
        milvus = MilvusLite(data / "milvus", log_dir)
        stores.append(milvus)
        env = {**GATEWAY_ENV, "GATEWAY_INDEX_BACKEND": "milvus", "GATEWAY_MILVUS_URI": milvus.uri}
    fronts = [gateway([text_service.address], "", env, log_dir) for _ in range(2)]
    channels: list[grpc.Channel] = []
    try:
        for store in stores:
            store.start()
        for store in stores:
            store.wait_ready()
        for number, front in enumerate(fronts):
            front.name = f"conformance-{backend}-gateway-{number}"
            front.start()
        for front in fronts:
            front.wait_serving()
        channels = [grpc.insecure_channel(front.address) for front in fronts]
        yield Index(backend, fronts, [gateway_pb2_grpc.GatewayStub(channel) for channel in channels])
    finally:
        for channel in channels:
            channel.close()
        for process in [*fronts, *stores]:
            process.stop()


def unit(dimension: int, seed: int) -> np.ndarray:
    row = np.random.default_rng(seed).standard_normal(dimension).astype(np.float32)
    return row / np.linalg.norm(row)


def vector_item(item_id: str, row: np.ndarray, payload: object = None) -> gw.UpsertItem:
    return gw.UpsertItem(
        id=item_id, vector=to_wire(row), payload_json="" if payload is None else json.dumps(payload)
    )


def search(
    stub: gateway_pb2_grpc.GatewayStub,
    space: str,
    query: np.ndarray,
    k: int = 10,
    payload: dict[str, str] | None = None,
    kinds: list[int] | None = None,
) -> gw.SearchResponse:
    return stub.Search(
        gw.SearchRequest(
            vector=to_wire(query),
            space=space,
            k=k,
            filter=pb.SearchFilter(payload_equals=payload or {}, kinds=kinds or []),
        ),
        timeout=20,
    )


def ids(response: gw.SearchResponse) -> list[str]:
    return [hit.id for hit in response.hits]


def refused(call: object, code: grpc.StatusCode = INVALID) -> str:
    """The details of the error `call()` raises, after checking its code."""
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


# --- upsert, replace, delete -----------------------------------------------------------------------------


def test_upserted_items_are_found_by_their_vector_with_their_payload(index: Index) -> None:
    space = "basics"
    rows = {f"item-{n}": unit(16, n) for n in range(40)}
    response = index.stub.Upsert(
        gw.UpsertRequest(
            space=space,
            request_id="r-1",
            items=[vector_item(item_id, row, {"n": item_id}) for item_id, row in rows.items()],
        ),
        timeout=20,
    )
    assert (response.upserted, response.request_id) == (40, "r-1")
    for item_id, row in list(rows.items())[:10]:
        found = search(index.stubs[1], space, row, k=3)  # through the other gateway too
        assert found.hits[0].id == item_id and found.hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert json.loads(found.hits[0].payload_json) == {"n": item_id}
        assert found.hits[0].shard and not found.partial and list(found.missing_shards) == []
        scores = [hit.score for hit in found.hits]
        assert scores == sorted(scores, reverse=True)
    everything = search(index.stub, space, rows["item-0"], k=1000)
    assert sorted(ids(everything)) == sorted(rows)


def test_an_upsert_replaces_by_id_and_the_last_of_duplicate_ids_wins(index: Index) -> None:
    space = "replace"
    first, second, third = unit(8, 1), unit(8, 2), unit(8, 3)
    index.stub.Upsert(
        gw.UpsertRequest(space=space, items=[vector_item("a", first, {"v": "1"}), vector_item("b", third)]),
        timeout=20,
    )
    index.stub.Upsert(gw.UpsertRequest(space=space, items=[vector_item("a", second, {"v": "2"})]), timeout=20)
    found = search(index.stub, space, second, k=10)
    assert sorted(ids(found)) == ["a", "b"]
    assert found.hits[0].id == "a" and json.loads(found.hits[0].payload_json) == {"v": "2"}
    assert ids(search(index.stub, space, first, k=10)).count("a") == 1
    fourth = unit(8, 4)
    twice = [vector_item("c", first, {"v": "first"}), vector_item("c", fourth, {"v": "last"})]
    assert index.stub.Upsert(gw.UpsertRequest(space=space, items=twice), timeout=20).upserted == 2
    by_last = search(index.stub, space, fourth, k=10)
    assert by_last.hits[0].id == "c" and json.loads(by_last.hits[0].payload_json) == {"v": "last"}
    assert sorted(ids(by_last)) == ["a", "b", "c"]  # one "c", not two


def test_delete_counts_what_it_found_and_what_it_did_not(index: Index) -> None:
    space = "deleting"
    rows = {f"d-{n}": unit(8, 100 + n) for n in range(6)}
    index.stub.Upsert(
        gw.UpsertRequest(space=space, items=[vector_item(i, row) for i, row in rows.items()]), timeout=20
    )
    deleted = index.stubs[1].Delete(
        gw.DeleteRequest(space=space, ids=["d-0", "d-1", "nope-1", "nope-2"]), timeout=20
    )
    assert (deleted.deleted, deleted.not_found) == (2, 2)
    again = index.stub.Delete(gw.DeleteRequest(space=space, ids=["d-0", "nope-1"]), timeout=20)
    assert (again.deleted, again.not_found) == (0, 2)
    assert sorted(ids(search(index.stub, space, rows["d-0"], k=100))) == [f"d-{n}" for n in range(2, 6)]
    never = index.stub.Delete(gw.DeleteRequest(space="never-written", ids=["x", "y"]), timeout=20)
    assert (never.deleted, never.not_found) == (0, 2)
    assert "space is empty" in refused(lambda: index.stub.Delete(gw.DeleteRequest(ids=["x"]), timeout=20))


def test_an_upsert_stream_answers_each_request_in_order(index: Index) -> None:
    space = "streamed"
    rows = {f"s-{n:04d}": unit(12, 1000 + n) for n in range(600)}
    keys = list(rows)

    def requests() -> Iterator[gw.UpsertRequest]:
        for start in range(0, len(keys), 60):
            chunk = keys[start : start + 60]
            yield gw.UpsertRequest(
                space=space, request_id=f"chunk-{start // 60}", items=[vector_item(i, rows[i]) for i in chunk]
            )

    answers = list(index.stub.UpsertStream(requests(), timeout=60))
    assert [answer.request_id for answer in answers] == [f"chunk-{n}" for n in range(10)]
    assert all(answer.upserted == 60 for answer in answers)
    for item_id in keys[::50]:
        assert search(index.stub, space, rows[item_id], k=1).hits[0].id == item_id
    assert len(search(index.stub, space, rows[keys[0]], k=1000).hits) == 600


# --- filters ---------------------------------------------------------------------------------------------

# Payload values, keys and ids made to change a filter expression if they were pasted into one: quotes of
# both kinds, backslashes, brackets, the expression language's operators, newlines, JSON-pointer steps.
HOSTILE = [
    '" or 1==1 or "',
    "' or 1==1 or '",
    '"] == "x" or payload["name',
    'x" || id != "',
    "back\\slash\\",
    'quote"inside',
    "line\nbreak",
    "tab\tand\r",
    "a/b",
    "~0~1",
    "ünïcödé 😀",
    "",
    "id in [] or true",
    "%s {n} $1",
]


def test_a_payload_filter_matches_its_exact_pairs_and_no_value_changes_the_expression(index: Index) -> None:
    space = "hostile-payloads"
    items = [
        vector_item(f"h-{n}", unit(8, 200 + n), {"name": value, "n": str(n)})
        for n, value in enumerate(HOSTILE)
    ]
    items.append(vector_item("plain", unit(8, 300), {"name": "plain", "n": "plain"}))
    items.append(vector_item("keyed", unit(8, 301), {key: "k" for key in HOSTILE}))
    items.append(vector_item("numeric", unit(8, 302), {"name": 5, "nested": {"name": "plain"}}))
    index.stub.Upsert(gw.UpsertRequest(space=space, items=items), timeout=20)
    query = unit(8, 999)
    for n, value in enumerate(HOSTILE):
        assert ids(search(index.stub, space, query, k=100, payload={"name": value})) == [f"h-{n}"], repr(
            value
        )
        assert ids(search(index.stub, space, query, k=100, payload={value: "k"})) == ["keyed"], repr(value)
    assert ids(search(index.stub, space, query, k=100, payload={"name": "plain"})) == ["plain"]
    assert ids(search(index.stub, space, query, k=100, payload={"name": "5"})) == []  # a number is no string
    assert ids(search(index.stub, space, query, k=100, payload={"name": "h-1", "n": "1"})) == []
    both = search(index.stub, space, query, k=100, payload={"name": HOSTILE[1], "n": "1"})
    assert ids(both) == ["h-1"]  # every pair must hold
    assert ids(search(index.stub, space, query, k=100, payload={"name": "nobody"})) == []


def test_ids_made_to_break_an_expression_are_stored_found_and_deleted_alone(index: Index) -> None:
    space = "hostile-ids"
    hostile = [value or "empty-not-allowed" for value in HOSTILE] + ["x' or id != '", 'x" or id != "']
    rows = {item_id: unit(8, 400 + n) for n, item_id in enumerate(hostile)}
    index.stub.Upsert(
        gw.UpsertRequest(space=space, items=[vector_item(i, row, {"id": i}) for i, row in rows.items()]),
        timeout=20,
    )
    for item_id, row in rows.items():
        found = search(index.stub, space, row, k=1)
        assert found.hits[0].id == item_id and json.loads(found.hits[0].payload_json) == {"id": item_id}
    doomed = ["x' or id != '", 'x" or id != "', "line\nbreak"]
    deleted = index.stub.Delete(gw.DeleteRequest(space=space, ids=doomed), timeout=20)
    assert (deleted.deleted, deleted.not_found) == (3, 0)
    left = ids(search(index.stub, space, rows[hostile[0]], k=100))
    assert sorted(left) == sorted(set(hostile) - set(doomed))


def test_kind_filters_keep_the_kinds_asked_for(index: Index) -> None:
    """Captions encoded by the text worker (kind TEXT) beside vectors of the same space (no kind)."""
    captions = {"cap-cat": "a cat sleeping on a sofa", "cap-rocket": "a rocket lifting off the launch pad"}
    index.stub.Upsert(
        gw.UpsertRequest(
            space="minilm",
            items=[
                gw.UpsertItem(id=item_id, input=pb.Input(text=text), payload_json='{"source": "caption"}')
                for item_id, text in captions.items()
            ],
        ),
        timeout=60,
    )
    index.stub.Upsert(
        gw.UpsertRequest(space="minilm", items=[vector_item("vec-1", unit(MINILM_DIM, 7))]), timeout=20
    )
    by_text = index.stub.Search(
        gw.SearchRequest(
            input=pb.Input(text="a kitten"), k=10, filter=pb.SearchFilter(kinds=[pb.INPUT_KIND_TEXT])
        ),
        timeout=60,
    )
    assert by_text.space == "minilm" and by_text.query_model.id == "all-MiniLM-L6-v2"
    assert ids(by_text)[0] == "cap-cat" and set(ids(by_text)) == set(captions)
    assert all(hit.kind == pb.INPUT_KIND_TEXT for hit in by_text.hits)
    unspecified = search(index.stub, "minilm", unit(MINILM_DIM, 7), k=10, kinds=[pb.INPUT_KIND_UNSPECIFIED])
    assert ids(unspecified) == ["vec-1"]
    images = search(index.stub, "minilm", unit(MINILM_DIM, 7), k=10, kinds=[pb.INPUT_KIND_IMAGE])
    assert ids(images) == []
    mixed = search(
        index.stub,
        "minilm",
        unit(MINILM_DIM, 7),
        k=10,
        kinds=[pb.INPUT_KIND_TEXT],
        payload={"source": "caption"},
    )
    assert set(ids(mixed)) == set(captions)


# --- spaces and dimensions -----------------------------------------------------------------------------

# Space names no Milvus collection may be called (it allows letters, digits and _ only, starting with a
# letter or _), and two that would become the same name if only cleaned up.
ODD_SPACES = ["clip-ViT-B-32", "a space/with ünïcode", "1starts-with-a-digit", "a-b", "a_b", "x" * 128]


def test_any_space_name_is_a_space_of_its_own(index: Index) -> None:
    for n, space in enumerate(ODD_SPACES):
        index.stub.Upsert(
            gw.UpsertRequest(space=space, items=[vector_item(f"in-{n}", unit(4, n))]), timeout=20
        )
    for n, space in enumerate(ODD_SPACES):
        found = search(index.stubs[1], space, unit(4, 0), k=10)
        assert (found.space, ids(found)) == (space, [f"in-{n}"])


def test_a_space_takes_the_dimension_of_its_first_write_and_keeps_it(index: Index) -> None:
    space = "dimensions"
    mixed = [vector_item("m-1", unit(8, 1)), vector_item("m-2", unit(16, 2))]
    assert "items[1].vector has 16 dimensions" in refused(
        lambda: index.stub.Upsert(gw.UpsertRequest(space=space, items=mixed), timeout=20)
    )
    assert "unknown" in refused(lambda: search(index.stub, space, unit(8, 1)))  # nothing was stored
    index.stub.Upsert(gw.UpsertRequest(space=space, items=[vector_item("first", unit(8, 1))]), timeout=20)
    for stub in index.stubs:
        details = refused(
            lambda stub=stub: stub.Upsert(gw.UpsertRequest(space=space, items=[mixed[1]]), timeout=20)
        )
        assert (
            "items[0].vector has 16 dimensions but space 'dimensions' holds 8-dimensional vectors" in details
        )
        assert "holds 8-dimensional vectors" in refused(lambda stub=stub: search(stub, space, unit(16, 3)))
    assert "holds 384-dimensional vectors" in refused(lambda: search(index.stub, "minilm", unit(8, 1)))


async def test_two_gateways_racing_to_create_a_space_agree_on_one_dimension(index: Index) -> None:
    channels = [grpc.aio.insecure_channel(front.address) for front in index.fronts]
    try:
        stubs = [gateway_pb2_grpc.GatewayStub(channel) for channel in channels]

        async def write(space: str, n: int) -> tuple[int, grpc.StatusCode, str]:
            dimension = 8 if n % 2 else 16
            items = [vector_item(f"{space}-{n}-{i}", unit(dimension, 100 * n + i)) for i in range(5)]
            try:
                await stubs[n % 2].Upsert(gw.UpsertRequest(space=space, items=items), timeout=30)
            except grpc.aio.AioRpcError as error:
                return dimension, error.code(), error.details() or ""
            return dimension, grpc.StatusCode.OK, ""

        for space in (f"race-{n}" for n in range(3)):
            results = await asyncio.gather(*(write(space, n) for n in range(10)))
            winners = {dimension for dimension, code, _ in results if code == grpc.StatusCode.OK}
            assert len(winners) == 1, results
            (won,) = winners
            for dimension, code, details in results:
                if dimension != won:
                    assert (code, f"holds {won}-dimensional vectors" in details) == (INVALID, True), details
            found = await stubs[0].Search(
                gw.SearchRequest(vector=to_wire(unit(won, 1)), space=space, k=1000), timeout=30
            )
            assert len(found.hits) == 5 * 5  # every winning write, whole
    finally:
        for channel in channels:
            await channel.close()


def test_a_dropped_space_is_gone_for_every_gateway_and_can_come_back_in_another_dimension(
    index: Index,
) -> None:
    one, other = index.stubs
    space = "cycle"
    one.Upsert(
        gw.UpsertRequest(space=space, items=[vector_item(f"old-{i}", unit(8, i)) for i in range(10)]),
        timeout=20,
    )
    assert search(other, space, unit(8, 3), k=1).hits[0].id == "old-3"  # the other gateway knows it now
    dropped = one.DropSpace(gw.DropSpaceRequest(space=space), timeout=20)
    assert (dropped.dropped, list(dropped.missing_shards)) == (10, [])
    assert "unknown" in refused(lambda: search(one, space, unit(8, 3)))
    assert refused(
        lambda: one.DropSpace(gw.DropSpaceRequest(space=space), timeout=20), grpc.StatusCode.NOT_FOUND
    )
    other.Upsert(
        gw.UpsertRequest(space=space, items=[vector_item(f"new-{i}", unit(16, i)) for i in range(4)]),
        timeout=20,
    )
    for stub in index.stubs:
        assert sorted(ids(search(stub, space, unit(16, 2), k=50))) == [f"new-{i}" for i in range(4)]
    never = refused(
        lambda: one.DropSpace(gw.DropSpaceRequest(space="never-made"), timeout=20), grpc.StatusCode.NOT_FOUND
    )
    assert "never-made" in never


# --- results and bad input -----------------------------------------------------------------------------


def test_k_up_to_the_limit_and_empty_results(index: Index, tiny_clip: TinyClip) -> None:
    space = "many"
    rows = [unit(8, 5000 + n) for n in range(1200)]
    for start in range(0, len(rows), 240):
        index.stub.Upsert(
            gw.UpsertRequest(
                space=space,
                items=[
                    vector_item(f"many-{start + i}", row) for i, row in enumerate(rows[start : start + 240])
                ],
            ),
            timeout=30,
        )
    found = search(index.stub, space, rows[0], k=1000)
    assert len(found.hits) == 1000 and found.hits[0].id == "many-0"
    exact = np.stack(rows) @ rows[0]
    assert [hit.id for hit in found.hits[:50]] == [
        f"many-{n}" for n in np.argsort(-exact, kind="stable")[:50]
    ]
    assert "k=1001 is out of range" in refused(lambda: search(index.stub, space, rows[0], k=1001))
    assert ids(search(index.stub, space, rows[0], k=10, payload={"missing": "value"})) == []
    assert "unknown" in refused(lambda: search(index.stub, "nowhere-at-all", rows[0]))
    nothing = search(index.stub, tiny_clip.space, unit(32, 0), k=10)  # a model's space, nothing stored
    assert (ids(nothing), nothing.space, nothing.partial) == ([], tiny_clip.space, False)


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (gw.SearchRequest(vector=to_wire(unit(8, 1)), space="basics", k=0), "k=0 is out of range"),
        (gw.SearchRequest(space="basics", k=3), "the query is empty"),
        (gw.SearchRequest(vector=to_wire(unit(8, 1)), k=3), "needs `space`"),
        (gw.SearchRequest(vector=to_wire(np.zeros(8, np.float32)), space="basics", k=3), "all zeros"),
        (
            gw.SearchRequest(
                vector=to_wire(unit(8, 1)), space="basics", k=3, filter=pb.SearchFilter(kinds=[99])
            ),
            "filter.kinds has unknown InputKind values [99]",
        ),
    ],
    ids=["k=0", "no query", "no space", "zero vector", "unknown kind"],
)
def test_a_bad_search_is_invalid_argument(index: Index, request_: gw.SearchRequest, fragment: str) -> None:
    assert fragment in refused(lambda: index.stub.Search(request_, timeout=20))


def test_a_bad_upsert_stores_nothing(index: Index) -> None:
    space = "bad-upserts"
    bad = [
        (gw.UpsertRequest(space=space, items=[vector_item("", unit(8, 1))]), "items[0].id is empty"),
        (
            gw.UpsertRequest(
                space=space, items=[gw.UpsertItem(id="p", vector=to_wire(unit(8, 1)), payload_json="[1]")]
            ),
            "must be a JSON object",
        ),
        (gw.UpsertRequest(space=space, items=[gw.UpsertItem(id="n")]), "has neither"),
        (
            gw.UpsertRequest(space=space, items=[vector_item("big", unit(8, 1), {"x": "y" * 17_000})]),
            "the limit is 16384",
        ),
    ]
    for request_, fragment in bad:
        assert fragment in refused(lambda request_=request_: index.stub.Upsert(request_, timeout=20))
    assert "unknown" in refused(lambda: search(index.stub, space, unit(8, 1)))


# --- one search across every space -----------------------------------------------------------------------


def test_a_search_across_every_space_fuses_by_rank_merges_ids_and_names_their_spaces(
    index: Index, tiny_clip: TinyClip
) -> None:
    """Text has models in two spaces here (MiniLM's and the tiny CLIP's): with `all_spaces` both are
    searched, each id is one hit whose sources are exactly its ranks in the one-space searches, and its
    score is the sum of 1 / (60 + rank)."""
    minilm, clip_text = "all-MiniLM-L6-v2", f"{tiny_clip.space}-text"
    tag = {"test": f"fusion-{index.backend}"}
    both = {
        "red-shoes": "a pair of red running shoes",
        "blue-hat": "a blue wool hat",
        "scarf": "a green scarf",
    }
    only = {minilm: {"only-minilm": "red leather boots"}, clip_text: {"only-clip": "a red umbrella"}}
    try:
        for model in (minilm, clip_text):
            items = [
                gw.UpsertItem(
                    id=key, input=pb.Input(text=text), payload_json=json.dumps({**tag, "by": model})
                )
                for key, text in {**both, **only[model]}.items()
            ]
            assert index.stub.Upsert(gw.UpsertRequest(model=model, items=items), timeout=60).upserted == 4
        query, where = pb.Input(text="red shoes"), pb.SearchFilter(payload_equals=tag)
        fused = index.stub.Search(
            gw.SearchRequest(input=query, k=10, filter=where, all_spaces=True), timeout=30
        )
        single = {
            space: index.stub.Search(
                gw.SearchRequest(input=query, k=10, filter=where, space=space), timeout=30
            )
            for space in ("minilm", tiny_clip.space)
        }
        assert (fused.space, fused.partial, list(fused.missing_spaces)) == ("", False, [])
        assert sorted((s.model.space, s.model.id, s.hits, s.empty, s.error) for s in fused.spaces) == sorted(
            [("minilm", minilm, 4, False, ""), (tiny_clip.space, clip_text, 4, False, "")]
        )
        assert sorted(ids(fused)) == sorted([*both, "only-minilm", "only-clip"])  # each id once
        model_of = {"minilm": minilm, tiny_clip.space: clip_text}
        for hit in fused.hits:
            ranks = {
                space: rank
                for space, response in single.items()
                for rank, one in enumerate(response.hits, start=1)
                if one.id == hit.id
            }
            assert {source.model.space: source.rank for source in hit.sources} == ranks, hit.id
            assert all(source.model.id == model_of[source.model.space] for source in hit.sources)
            assert hit.score == pytest.approx(sum(1 / (60 + rank) for rank in ranks.values()), rel=1e-5)
            best = min(hit.sources, key=lambda source: source.rank)
            assert json.loads(hit.payload_json)["by"] == model_of[best.model.space]  # its best source's
        assert [source.model.space for source in fused.hits[ids(fused).index("only-clip")].sources] == [
            tiny_clip.space
        ]
        assert [hit.score for hit in fused.hits] == sorted((hit.score for hit in fused.hits), reverse=True)
        # Naming one space is what it was: that space only, no sources.
        assert single["minilm"].space == "minilm" and not any(hit.sources for hit in single["minilm"].hits)
        assert ids(single["minilm"])[0] == "red-shoes"
    finally:
        index.stub.Delete(gw.DeleteRequest(space="minilm", ids=[*both, "only-minilm"]), timeout=30)
        index.stub.DropSpace(gw.DropSpaceRequest(space=tiny_clip.space), timeout=30)
