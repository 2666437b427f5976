"""The Index servicer called directly: every bad request is refused with a message naming the field, and a
refused request leaves no trace (no item, no log record, no claimed dimension)."""

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument, ServiceError
from services.common.vectors import to_wire
from services.index.service import IndexService
from services.index.settings import IndexSettings
from services.index.store import IndexStore

_CONTEXT: Any = None  # the servicer never touches its context
_DIM = 8


def _unit(seed: int, dim: int = _DIM) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def _item(
    item_id: str, vector: np.ndarray | None, kind: int = pb.INPUT_KIND_TEXT, payload: str = ""
) -> idx.IndexItem:
    item = idx.IndexItem(id=item_id, kind=kind, payload_json=payload, model=pb.ModelRef(id="m", version="1"))
    if vector is not None:
        item.vector.CopyFrom(to_wire(vector))
    return item


@dataclass
class Shard:
    store: IndexStore
    service: IndexService
    settings: IndexSettings

    async def upsert(self, space: str, *items: idx.IndexItem) -> idx.IndexUpsertResponse:
        return await self.service.Upsert(
            idx.IndexUpsertRequest(space=space, items=items, request_id="r"), _CONTEXT
        )

    async def search(self, space: str, query: np.ndarray, k: int = 5, **filters: Any) -> list[pb.Hit]:
        request = idx.IndexSearchRequest(
            space=space, query=to_wire(query), k=k, filter=pb.SearchFilter(**filters)
        )
        return list((await self.service.Search(request, _CONTEXT)).hits)

    def footprint(self) -> dict[str, Any]:
        """Everything a request could change: each space's rows, the claimed dimensions, the log's bytes."""
        spaces = {}
        for held in self.store.held():
            state = held.state()
            spaces[held.name] = (
                state["ids"],
                np.asarray(state["vectors"]).tobytes(),
                np.asarray(state["alive"]).tolist(),
                state["payloads"],
            )
        log = Path(self.settings.data_dir) / "log"
        return {
            "spaces": spaces,
            "dimensions": dict(self.store._dimensions),
            "log": b"".join(path.read_bytes() for path in sorted(log.glob("*.log"))),
        }


@pytest.fixture
async def shard(tmp_path: Path) -> AsyncIterator[Shard]:
    settings = IndexSettings(
        data_dir=str(tmp_path / "index"),
        fsync="always",
        snapshot_every_ops=100_000,
        snapshot_interval_s=3600.0,
        ann_threshold=0,
        max_k=50,
        max_items_per_request=4,
        max_payload_bytes=64,
        max_id_bytes=16,
    )
    store = IndexStore(settings)
    await store.open()
    service = IndexService(store, settings, "shard-a")
    # What every test starts from: space "s" with three 8-d items.
    await service.Upsert(
        idx.IndexUpsertRequest(
            space="s",
            items=[_item("a", _unit(1), payload='{"c": "red"}'), _item("b", _unit(2)), _item("c", _unit(3))],
        ),
        _CONTEXT,
    )
    yield Shard(store, service, settings)
    await store.close()


def _bad_vector(data: bytes, dim: int) -> pb.Vector:
    return pb.Vector(data=data, dim=dim, dtype=pb.DTYPE_FLOAT32)


def _with_vector(item_id: str, vector: pb.Vector) -> idx.IndexItem:
    item = _item(item_id, None)
    item.vector.CopyFrom(vector)
    return item


_NAN = np.full(_DIM, np.nan, dtype=np.float32)
_INF = np.array([np.inf] + [0.0] * (_DIM - 1), dtype=np.float32)

# (case, the bad third item of a request, message fragment that names the field)
_BAD_ITEMS: list[tuple[str, Callable[[], idx.IndexItem], str]] = [
    ("empty id", lambda: _item("", _unit(9)), r"items\[2\]\.id is empty"),
    ("id too long", lambda: _item("x" * 17, _unit(9)), r"items\[2\]\.id is longer than 16 bytes"),
    ("id too long in utf-8", lambda: _item("é" * 9, _unit(9)), r"items\[2\]\.id is longer than 16 bytes"),
    (
        "payload not json",
        lambda: _item("z", _unit(9), payload="{nope"),
        r"items\[2\]\.payload_json is not valid JSON",
    ),
    (
        "payload a list",
        lambda: _item("z", _unit(9), payload='["a"]'),
        r"items\[2\]\.payload_json must be a JSON object, not list",
    ),
    (
        "payload a string",
        lambda: _item("z", _unit(9), payload='"a"'),
        r"items\[2\]\.payload_json must be a JSON object",
    ),
    (
        "payload too big",
        lambda: _item("z", _unit(9), payload=json.dumps({"k": "v" * 64})),
        r"items\[2\]\.payload_json is 73 bytes; the limit is 64",
    ),
    ("nan", lambda: _item("z", _NAN), r"items\[2\]\.vector holds NaN or infinite"),
    ("inf", lambda: _item("z", _INF), r"items\[2\]\.vector holds NaN or infinite"),
    (
        "data length",
        lambda: _with_vector("z", _bad_vector(b"\0" * 31, _DIM)),
        r"items\[2\]\.vector\.data has 31 bytes",
    ),
    ("dim 0", lambda: _with_vector("z", _bad_vector(b"", 0)), r"items\[2\]\.vector\.dim is 0"),
    ("zero vector", lambda: _item("z", np.zeros(_DIM, dtype=np.float32)), r"items\[2\]\.vector is all zeros"),
    ("wrong dimension", lambda: _item("z", _unit(9, dim=16)), r"items\[2\]\.vector has 16 dimensions"),
    (
        "unknown kind",
        lambda: _item("z", _unit(9), kind=99),
        r"items\[2\]\.kind has unknown InputKind values \[99\]",
    ),
    ("missing vector", lambda: _item("z", None), r"items\[2\]\.vector is missing"),
]


async def _still_works(shard: Shard, space: str = "s") -> None:
    """A valid upsert and search go through after a refused request."""
    vector = _unit(1000)
    response = await shard.upsert(space, _item("fine", vector, payload='{"ok": "yes"}'))
    assert response.upserted == 1 and response.request_id == "r"
    hits = await shard.search(space, vector, k=1)
    assert [(hit.id, hit.payload_json, hit.shard) for hit in hits] == [("fine", '{"ok": "yes"}', "shard-a")]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("space", ["s", "new"], ids=["existing-space", "new-space"])
@pytest.mark.parametrize(("case", "bad", "message"), _BAD_ITEMS, ids=[case for case, _, _ in _BAD_ITEMS])
async def test_a_bad_item_refuses_the_whole_upsert(
    shard: Shard, space: str, case: str, bad: Callable[[], idx.IndexItem], message: str
) -> None:
    before = shard.footprint()
    good = (_item("x1", _unit(11)), _item("x2", _unit(12)))
    with pytest.raises(InvalidArgument, match=message):
        await shard.upsert(space, *good, bad())
    assert shard.footprint() == before
    assert shard.store.dimension(space) == (_DIM if space == "s" else None)
    if space == "new":
        with pytest.raises(ServiceError) as missing:
            await shard.search(space, _unit(11))
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
    else:
        assert "x1" not in {hit.id for hit in await shard.search(space, _unit(11), k=50)}
    await _still_works(shard, space)


async def test_a_new_space_takes_the_dimension_of_its_first_accepted_request(shard: Shard) -> None:
    with pytest.raises(
        InvalidArgument,
        match=r"items\[1\]\.vector has 16 dimensions but items\[0\]\.vector, the first of new space .new., has 8",
    ):
        await shard.upsert("new", _item("x1", _unit(11)), _item("x2", _unit(12, dim=16)))
    # the refused request claimed nothing: a 16-d space is still possible
    await shard.upsert("new", _item("y1", _unit(13, dim=16)))
    assert shard.store.dimension("new") == 16
    with pytest.raises(
        InvalidArgument, match=r"items\[0\]\.vector has 8 dimensions but space 'new' holds 16"
    ):
        await shard.upsert("new", _item("y2", _unit(14)))
    assert [hit.id for hit in await shard.search("new", _unit(13, dim=16), k=5)] == ["y1"]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (idx.IndexUpsertRequest(space="", items=[_item("a", _unit(1))]), "space is empty"),
        (idx.IndexUpsertRequest(space="s", items=[]), "items is empty"),
        (
            idx.IndexUpsertRequest(space="s", items=[_item(f"n{n}", _unit(n)) for n in range(5)]),
            r"items has 5 entries; the limit is 4",
        ),
    ],
    ids=["empty space", "no items", "too many items"],
)
async def test_bad_upsert_requests(shard: Shard, request_: idx.IndexUpsertRequest, message: str) -> None:
    before = shard.footprint()
    with pytest.raises(InvalidArgument, match=message):
        await shard.service.Upsert(request_, _CONTEXT)
    assert shard.footprint() == before
    await _still_works(shard)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            idx.IndexSearchRequest(space="s", query=to_wire(_unit(1)), k=0),
            r"k=0 is out of range; use 1\.\.50",
        ),
        (
            idx.IndexSearchRequest(space="s", query=to_wire(_unit(1)), k=51),
            r"k=51 is out of range; use 1\.\.50",
        ),
        (idx.IndexSearchRequest(space="", query=to_wire(_unit(1)), k=5), "space is empty"),
        (idx.IndexSearchRequest(space="s", k=5), r"query\.dim is 0"),
        (idx.IndexSearchRequest(space="s", query=to_wire(_NAN), k=5), "query holds NaN or infinite"),
        (idx.IndexSearchRequest(space="s", query=to_wire(_INF), k=5), "query holds NaN or infinite"),
        (idx.IndexSearchRequest(space="s", query=to_wire(np.zeros(_DIM)), k=5), "query is all zeros"),
        (
            idx.IndexSearchRequest(space="s", query=_bad_vector(b"\0" * 5, _DIM), k=5),
            r"query\.data has 5 bytes",
        ),
        (
            idx.IndexSearchRequest(space="s", query=to_wire(_unit(1, dim=4)), k=5),
            "query has 4 dimensions but space 's' holds 8-dimensional",
        ),
        (
            idx.IndexSearchRequest(
                space="s",
                query=to_wire(_unit(1)),
                k=5,
                filter=pb.SearchFilter(kinds=[pb.INPUT_KIND_TEXT, 42]),
            ),
            r"filter\.kinds has unknown InputKind values \[42\]",
        ),
    ],
    ids=[
        "k=0",
        "k>max_k",
        "empty space",
        "no query",
        "nan",
        "inf",
        "zero",
        "data length",
        "dimension",
        "kind",
    ],
)
async def test_bad_search_requests(shard: Shard, request_: idx.IndexSearchRequest, message: str) -> None:
    before = shard.footprint()
    with pytest.raises(InvalidArgument, match=message):
        await shard.service.Search(request_, _CONTEXT)
    assert shard.footprint() == before
    await _still_works(shard)


async def test_search_on_a_space_the_shard_does_not_hold(shard: Shard) -> None:
    with pytest.raises(ServiceError) as raised:
        await shard.search("elsewhere", _unit(1))
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert not isinstance(raised.value, InvalidArgument)
    assert "elsewhere" in raised.value.message and "shard-a" in raised.value.message


async def test_search_results_and_filters(shard: Shard) -> None:
    await shard.upsert("s", _item("img", _unit(1), kind=pb.INPUT_KIND_IMAGE, payload='{"c": "red"}'))
    hits = await shard.search("s", _unit(1), k=10)
    assert [hit.id for hit in hits][:2] in (["a", "img"], ["img", "a"])
    assert len(hits) == 4
    assert [hit.id for hit in await shard.search("s", _unit(1), k=10, kinds=[pb.INPUT_KIND_IMAGE])] == ["img"]
    red = await shard.search("s", _unit(2), k=10, payload_equals={"c": "red"})
    assert sorted(hit.id for hit in red) == ["a", "img"]
    both = await shard.search("s", _unit(2), k=10, kinds=[pb.INPUT_KIND_TEXT], payload_equals={"c": "red"})
    assert [(hit.id, hit.kind) for hit in both] == [("a", pb.INPUT_KIND_TEXT)]


async def test_duplicate_ids_in_one_request_last_wins(shard: Shard) -> None:
    first, last = _unit(21), _unit(22)
    response = await shard.upsert(
        "s",
        _item("dup", first, payload='{"v": "first"}'),
        _item("dup", last, kind=pb.INPUT_KIND_IMAGE, payload='{"v": "last"}'),
    )
    assert response.upserted == 2
    hits = await shard.search("s", last, k=1)
    assert [(hit.id, hit.kind, hit.payload_json) for hit in hits] == [
        ("dup", pb.INPUT_KIND_IMAGE, '{"v": "last"}')
    ]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    from_first = [hit for hit in await shard.search("s", first, k=10) if hit.id == "dup"]
    assert len(from_first) == 1 and from_first[0].score == pytest.approx(float(first @ last), abs=1e-5)
    stats = await shard.service.Stats(idx.IndexStatsRequest(space="s"), _CONTEXT)
    assert [(space.space, space.count, space.dimension, space.engine) for space in stats.spaces] == [
        ("s", 4, _DIM, "exact")
    ]


async def test_delete_counts_deleted_and_not_found(shard: Shard) -> None:
    response = await shard.service.Delete(
        idx.IndexDeleteRequest(space="s", ids=["a", "nope", "b", "a"]), _CONTEXT
    )
    assert (response.deleted, response.not_found) == (2, 1)
    assert [hit.id for hit in await shard.search("s", _unit(1), k=10)] == ["c"]
    again = await shard.service.Delete(idx.IndexDeleteRequest(space="s", ids=["a"]), _CONTEXT)
    assert (again.deleted, again.not_found) == (0, 1)
    elsewhere = await shard.service.Delete(idx.IndexDeleteRequest(space="other", ids=["a", "b"]), _CONTEXT)
    assert (elsewhere.deleted, elsewhere.not_found) == (0, 2)
    stats = await shard.service.Stats(idx.IndexStatsRequest(), _CONTEXT)
    assert [(space.space, space.count) for space in stats.spaces] == [("s", 1)]


@pytest.mark.parametrize(
    ("ids", "space", "message"),
    [
        (["a", "b", ""], "s", r"ids\[2\] is empty"),
        (["a", "b", "y" * 17], "s", r"ids\[2\] is longer than 16 bytes"),
        ([], "s", "ids is empty"),
        (["a", "b", "c", "d", "e"], "s", "ids has 5 entries; the limit is 4"),
        (["a"], "", "space is empty"),
    ],
    ids=["empty id", "id too long", "no ids", "too many ids", "empty space"],
)
async def test_bad_delete_requests_delete_nothing(
    shard: Shard, ids: list[str], space: str, message: str
) -> None:
    before = shard.footprint()
    with pytest.raises(InvalidArgument, match=message):
        await shard.service.Delete(idx.IndexDeleteRequest(space=space, ids=ids), _CONTEXT)
    assert shard.footprint() == before
    assert sorted(hit.id for hit in await shard.search("s", _unit(1), k=10)) == ["a", "b", "c"]
    await _still_works(shard)
