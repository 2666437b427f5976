"""The index shard's store: durable writes, restarts (clean and killed), snapshots, engines and filters."""

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument
from services.index import space as space_module
from services.index.records import Op
from services.index.store import IndexStore
from tests.unit.index_data import (
    Contents,
    OpenStore,
    apply_to,
    assert_contents,
    contents,
    delete,
    kill,
    segment_numbers,
    snapshot_names,
    store_settings,
    unit_rows,
    until,
    upsert,
)

_KINDS = (pb.INPUT_KIND_TEXT, pb.INPUT_KIND_IMAGE, pb.INPUT_KIND_USER)
_COLOURS = ("red", "green", "blue", "black")


async def _search_ids(
    store: IndexStore,
    space: str,
    query: np.ndarray,
    k: int,
    kinds: Sequence[int] = (),
    payload_equals: dict[str, str] | None = None,
) -> list[str]:
    return [hit.id for hit in await store.search(space, query, k, kinds, payload_equals or {})]


async def test_upsert_then_search_finds_the_item(tmp_path: Path, open_store: OpenStore) -> None:
    store = await open_store(store_settings(tmp_path))
    rows = unit_rows(20, 8, seed=1)
    await store.write(
        [upsert("s", f"i{n}", rows[n], kind=_KINDS[n % 3], payload=f'{{"n": "{n}"}}') for n in range(20)]
    )
    for n in range(20):
        hits = await store.search("s", rows[n], 3, (), {})
        assert len(hits) == 3
        assert hits[0].id == f"i{n}"
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].kind == _KINDS[n % 3]
        assert json.loads(hits[0].payload_json) == {"n": str(n)}
        assert hits[0].score >= hits[1].score >= hits[2].score
    assert await store.search("elsewhere", rows[0], 3, (), {}) == []


async def test_a_closed_store_reopens_with_the_same_items(tmp_path: Path, open_store: OpenStore) -> None:
    settings = store_settings(tmp_path)
    store = await open_store(settings)
    rows = unit_rows(60, 16, seed=2)
    expected: Contents = {}
    ops = [upsert("s", f"i{n}", rows[n], kind=_KINDS[n % 3], payload=f'{{"n": "{n}"}}') for n in range(50)]
    ops += [delete("s", f"i{n}") for n in range(0, 50, 7)]
    ops += [upsert("s", f"i{n}", rows[50 + n], payload="") for n in range(1, 10, 3)]
    ops += [upsert("other", "only", rows[59])]
    await store.write(ops)
    apply_to(expected, [op for op in ops if op.space == "s"])
    assert_contents(store, "s", expected)
    await store.close()
    assert snapshot_names(settings) != []

    reopened = await open_store(settings)
    assert reopened._unsnapshotted == 0  # the close() snapshot covered everything: nothing replayed
    assert_contents(reopened, "s", expected)
    assert_contents(reopened, "other", {"only": (rows[59], 1, "", ("model", "v1"))})
    assert [held.name for held in reopened.held()] == ["other", "s"]
    assert reopened.dimension("s") == 16


async def test_a_killed_store_comes_back_from_the_log(tmp_path: Path, open_store: OpenStore) -> None:
    settings = store_settings(tmp_path)
    store = await open_store(settings)
    rows = unit_rows(40, 8, seed=3)
    expected: Contents = {}
    batches = [
        [
            upsert("s", f"i{n}", rows[n], kind=_KINDS[n % 3], payload=f'{{"c": "{_COLOURS[n % 4]}"}}')
            for n in range(20)
        ],
        # duplicate ids in one write: the last one wins
        [
            upsert("s", "dup", rows[20], payload='{"v": "first"}'),
            upsert("s", "dup", rows[21], payload='{"v": "last"}'),
        ],
        [upsert("s", "i3", rows[22], kind=pb.INPUT_KIND_ITEM, payload='{"v": "overwritten"}')],
        [delete("s", "i4"), delete("s", "never-there"), upsert("s", "i4", rows[23]), delete("s", "i4")],
        [delete("s", "i5"), upsert("s", "i5", rows[24], payload='{"v": "back"}')],
    ]
    # Concurrent writers share the writer's batches (and fsyncs); each is acknowledged once durable.
    await asyncio.gather(*(store.write(batch) for batch in batches))
    for batch in batches:
        apply_to(expected, batch)
    more = [upsert("s", f"j{n}", rows[25 + n]) for n in range(10)] + [delete("s", "i0")]
    await store.write(more)
    apply_to(expected, more)
    assert_contents(store, "s", expected)
    assert contents(store, "s")["dup"][2] == '{"v": "last"}'

    await kill(store)
    assert snapshot_names(settings) == []  # so all of it must come from the log

    reopened = await open_store(settings)
    assert_contents(reopened, "s", expected)
    assert reopened._unsnapshotted == sum(map(len, batches)) + len(more)
    hits = await reopened.search("s", rows[21], 1, (), {})
    assert [(hit.id, hit.payload_json) for hit in hits] == [("dup", '{"v": "last"}')]
    near_deleted = await _search_ids(reopened, "s", rows[23], 40)
    assert len(near_deleted) == len(expected) and "i4" not in near_deleted


async def test_snapshot_then_log_replay(tmp_path: Path, open_store: OpenStore) -> None:
    settings = store_settings(tmp_path, snapshot_every_ops=40)
    store = await open_store(settings)
    rows = unit_rows(100, 8, seed=4)
    expected: Contents = {}
    first = [upsert("s", f"i{n}", rows[n], payload=f'{{"n": "{n}"}}') for n in range(30)]
    await store.write(first)
    apply_to(expected, first)
    assert snapshot_names(settings) == [] and segment_numbers(settings) == [0]

    second = [upsert("s", f"i{n}", rows[n]) for n in range(30, 45)] + [delete("s", "i1")]
    await store.write(second)  # 46 ops >= 40: the writer snapshots after this batch
    apply_to(expected, second)
    await until(lambda: store._snapshot_task is not None and store._snapshot_task.done())
    assert snapshot_names(settings) == [f"{1:012d}"]
    # segment 0 is covered by the snapshot, but kept: if that snapshot is ever found damaged, the log from
    # segment 0 rebuilds everything (the segments go once a second snapshot is read back intact)
    assert segment_numbers(settings) == [0, 1]

    third = [upsert("s", f"i{n}", rows[n]) for n in range(45, 55)]
    third += [delete("s", "i2"), delete("s", "i40"), upsert("s", "i3", rows[99], kind=pb.INPUT_KIND_IMAGE)]
    await store.write(third)  # 13 ops: no second snapshot
    apply_to(expected, third)
    await kill(store)
    assert snapshot_names(settings) == [f"{1:012d}"] and segment_numbers(settings) == [0, 1]

    reopened = await open_store(settings)
    assert reopened._unsnapshotted == len(third)  # only what came after the snapshot was replayed
    assert_contents(reopened, "s", expected)
    for n in (0, 10, 44, 54):
        assert (await _search_ids(reopened, "s", rows[n], 1)) == [f"i{n}"]
    assert (await _search_ids(reopened, "s", rows[99], 1)) == ["i3"]


async def test_a_half_written_snapshot_is_ignored(tmp_path: Path, open_store: OpenStore) -> None:
    settings = store_settings(tmp_path)
    store = await open_store(settings)
    rows = unit_rows(12, 8, seed=5)
    ops = [upsert("s", f"i{n}", rows[n], payload='{"a": "b"}') for n in range(10)]
    await store.write(ops)
    await store.close()
    expected: Contents = {}
    apply_to(expected, ops)
    complete = snapshot_names(settings)
    assert len(complete) == 1

    junk = Path(settings.data_dir) / "snapshots" / f".tmp-{int(complete[0]) + 1:012d}"
    junk.mkdir(parents=True)
    (junk / "MANIFEST").write_text("0" * 64 + '\n{"format": 2, "spa')  # cut short
    (junk / "data").write_bytes(b"garbage")

    reopened = await open_store(settings)
    assert_contents(reopened, "s", expected)

    later = [upsert("s", "late", rows[11])]
    await reopened.write(later)
    await reopened.close()  # its snapshot removes the half-written one
    apply_to(expected, later)
    assert not junk.exists()
    assert snapshot_names(settings) == [complete[0], f"{int(complete[0]) + 1:012d}"]  # the newest two
    assert_contents(await open_store(settings), "s", expected)


async def test_claim_dimension(tmp_path: Path, open_store: OpenStore) -> None:
    settings = store_settings(tmp_path)
    store = await open_store(settings)
    store.claim_dimension("s", 8, "items[0].vector")
    store.claim_dimension("s", 8, "items[1].vector")
    with pytest.raises(InvalidArgument, match=r"items\[2\]\.vector has 16 dimensions .* 's' holds 8"):
        store.claim_dimension("s", 16, "items[2].vector")
    store.claim_dimension("t", 16, "items[0].vector")  # another space has its own dimension
    await store.write([upsert("s", "a", unit_rows(1, 8, seed=6)[0])])
    await store.close()

    reopened = await open_store(settings)
    assert reopened.dimension("s") == 8
    assert reopened.dimension("t") is None  # claimed, never written: not remembered
    with pytest.raises(InvalidArgument, match="query has 4 dimensions"):
        reopened.claim_dimension("s", 4, "query")


def _filter_ops(rows: np.ndarray) -> list[Op]:
    """Items with kinds TEXT/IMAGE/USER in turn and a colour payload (every 10th: no payload)."""
    ops = []
    for n in range(rows.shape[0]):
        payload = "" if n % 10 == 9 else json.dumps({"colour": _COLOURS[n % 4], "n": n, "tag": str(n % 2)})
        ops.append(upsert("s", f"i{n}", rows[n], kind=_KINDS[n % 3], payload=payload))
    return ops


def _matches(n: int, kinds: Sequence[int], payload_equals: dict[str, str]) -> bool:
    if kinds and _KINDS[n % 3] not in kinds:
        return False
    if not payload_equals:
        return True
    if n % 10 == 9:
        return False
    payload = {"colour": _COLOURS[n % 4], "tag": str(n % 2)}
    return all(payload.get(key) == value for key, value in payload_equals.items())


_ENGINES = [
    pytest.param("exact", False, id="exact"),
    pytest.param("sq8", False, id="sq8"),
    pytest.param("hnsw", False, id="hnsw"),
    # Filters and tombstones narrow enough are searched exactly over the selected rows; these force the
    # selection through the ANN engine itself (a FAISS ID selector).
    pytest.param("sq8", True, id="sq8-selector"),
    pytest.param("hnsw", True, id="hnsw-selector"),
]


async def _filled(
    tmp_path: Path, open_store: OpenStore, engine: str, monkeypatch: pytest.MonkeyPatch, through_engine: bool
) -> tuple[IndexStore, np.ndarray]:
    if through_engine:
        monkeypatch.setattr(space_module, "_EXACT_FILTER_ROWS", 0)
    threshold = 0 if engine == "exact" else 200
    settings = store_settings(
        tmp_path, ann_threshold=threshold, ann_engine="sq8" if engine == "exact" else engine
    )
    store = await open_store(settings)
    rows = unit_rows(300, 32, seed=7)
    await store.write(_filter_ops(rows))
    assert store.held("s")[0].engine.name == engine
    return store, rows


@pytest.mark.parametrize(("engine", "through_engine"), _ENGINES)
async def test_filters(
    tmp_path: Path, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch, engine: str, through_engine: bool
) -> None:
    store, rows = await _filled(tmp_path, open_store, engine, monkeypatch, through_engine)
    filters: list[tuple[list[int], dict[str, str]]] = [
        ([pb.INPUT_KIND_TEXT], {}),
        ([pb.INPUT_KIND_IMAGE, pb.INPUT_KIND_USER], {}),
        ([], {"colour": "red"}),
        ([], {"colour": "blue", "tag": "0"}),
        ([pb.INPUT_KIND_USER], {"colour": "green"}),
    ]
    k = 10
    for kinds, payload_equals in filters:
        allowed = [n for n in range(300) if _matches(n, kinds, payload_equals)]
        assert len(allowed) >= k
        recalled = 0
        for n in range(0, 300, 15):
            hits = await store.search("s", rows[n], k, kinds, payload_equals)
            ids = [hit.id for hit in hits]
            assert len(ids) == k, (kinds, payload_equals)
            for hit in hits:
                number = int(hit.id[1:])
                assert _matches(number, kinds, payload_equals), (hit.id, kinds, payload_equals)
                assert hit.kind == _KINDS[number % 3]
                assert hit.score == pytest.approx(float(rows[number] @ rows[n]), abs=1e-5)
            if _matches(n, kinds, payload_equals):
                assert ids[0] == f"i{n}" and hits[0].score == pytest.approx(1.0, abs=1e-5)
            else:
                assert f"i{n}" not in ids
            scores = rows[allowed] @ rows[n]
            best = {f"i{allowed[row]}" for row in np.argsort(-scores)[:k]}
            recalled += len(best & set(ids))
        assert recalled >= 0.9 * k * 20, (kinds, payload_equals, recalled)

    assert await store.search("s", rows[0], k, [pb.INPUT_KIND_ITEM], {}) == []
    assert await store.search("s", rows[0], k, [], {"colour": "purple"}) == []
    assert await store.search("s", rows[0], k, [], {"n": "0"}) == []  # only string values are terms
    # with no filter at all every item is a candidate
    unfiltered = await _search_ids(store, "s", rows[9], k)
    assert unfiltered[0] == "i9"


@pytest.mark.parametrize(("engine", "through_engine"), _ENGINES)
async def test_deleted_items_never_appear(
    tmp_path: Path, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch, engine: str, through_engine: bool
) -> None:
    store, rows = await _filled(tmp_path, open_store, engine, monkeypatch, through_engine)
    deleted = {f"i{n}" for n in range(0, 300, 3)}
    moved = unit_rows(20, 32, seed=8)
    overwritten = {f"i{n}": moved[position] for position, n in enumerate(range(1, 300, 15))}
    await store.write([delete("s", item_id) for item_id in sorted(deleted)])
    await store.write([upsert("s", item_id, vector) for item_id, vector in overwritten.items()])
    held = store.held("s")[0]
    assert held.live == 200 and held.count == 320
    assert held.engine.name == engine  # live items stay above the threshold

    for n in range(0, 300, 3):
        # (every TEXT item but the 20 overwritten ones was deleted: filter on the other kinds)
        for kinds, payload_equals in (([], {}), ([_KINDS[1 + n % 2]], {}), ([], {"tag": str(n % 2)})):
            ids = await _search_ids(store, "s", rows[n], 20, kinds, payload_equals)
            assert len(ids) == 20
            assert not deleted & set(ids), (n, kinds, payload_equals)
    for item_id, vector in overwritten.items():
        old = rows[int(item_id[1:])]
        for hit in await store.search("s", old, 300, (), {}):
            if hit.id == item_id:  # found by its new vector only
                assert hit.score == pytest.approx(float(vector @ old), abs=1e-5)
        hits = await store.search("s", vector, 1, (), {})
        assert hits[0].id == item_id and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].kind == pb.INPUT_KIND_TEXT and hits[0].payload_json == ""
    total = await store.search("s", rows[0], 1000, (), {})
    assert len(total) == 200 and len({hit.id for hit in total}) == 200
    assert not deleted & {hit.id for hit in total}


@pytest.mark.parametrize("engine", ["sq8", "hnsw"])
async def test_engine_switches_at_the_threshold_and_survives_restarts(
    tmp_path: Path, open_store: OpenStore, engine: str
) -> None:
    settings = store_settings(tmp_path / "first", ann_threshold=200, ann_engine=engine)
    store = await open_store(settings)
    rows = unit_rows(260, 32, seed=9)
    await store.write([upsert("s", f"i{n}", rows[n]) for n in range(199)])
    assert store.held("s")[0].engine.name == "exact"
    await store.write([upsert("s", "i199", rows[199])])
    assert store.held("s")[0].engine.name == engine
    await store.write([upsert("s", f"i{n}", rows[n]) for n in range(200, 250)])
    queries = unit_rows(5, 32, seed=10)
    before = [await _search_ids(store, "s", query, 10) for query in queries]
    for query, ids in zip(queries, before, strict=True):
        assert ids == [f"i{n}" for n in np.argsort(-(rows[:250] @ query))[:10]]
    await store.close()

    # from the snapshot: nothing was retired, so its serialised ANN index is reused as it was
    reopened = await open_store(settings)
    assert reopened.held("s")[0].engine.name == engine
    assert [await _search_ids(reopened, "s", query, 10) for query in queries] == before
    await reopened.write([upsert("s", f"i{n}", rows[n]) for n in range(250, 260)])
    await kill(reopened)

    # from the snapshot plus the replayed log
    again = await open_store(settings)
    assert again.held("s")[0].engine.name == engine
    assert again.held("s")[0].live == 260
    assert (await _search_ids(again, "s", rows[255], 1)) == ["i255"]

    # from the log alone: the switch happens during the replay; overwrites do not count towards it
    second = store_settings(tmp_path / "second", ann_threshold=200, ann_engine=engine)
    fresh = await open_store(second)
    await fresh.write([upsert("s", f"i{n}", rows[n]) for n in range(199)])
    await fresh.write([upsert("s", "i0", rows[259])])  # 199 live items still
    assert fresh.held("s")[0].engine.name == "exact"
    await fresh.write([upsert("s", f"i{n}", rows[n]) for n in range(199, 210)])
    assert fresh.held("s")[0].engine.name == engine
    await kill(fresh)
    replayed = await open_store(second)
    assert snapshot_names(second) == []
    assert replayed.held("s")[0].engine.name == engine
    assert replayed.held("s")[0].live == 210
    assert (await _search_ids(replayed, "s", rows[259], 1)) == ["i0"]

    # retired rows are dropped on load, which leaves fewer items than the threshold: exact again
    await replayed.write([delete("s", f"i{n}") for n in range(20)])
    assert replayed.held("s")[0].engine.name == engine  # no switch back while running
    await replayed.close()
    shrunk = await open_store(second)
    assert shrunk.held("s")[0].live == 190
    assert shrunk.held("s")[0].engine.name == "exact"


async def test_with_fsync_interval_writes_are_acknowledged_unsynced_then_synced_on_the_period(
    tmp_path: Path, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INDEX_FSYNC=interval: a write is acknowledged once written (no fsync on its path); the periodic
    fsync then makes it durable and moves the COMMITTED marker; a killed process loses nothing."""
    from services.index import committed, wal

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(wal.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    settings = store_settings(tmp_path, fsync="interval", fsync_interval_ms=50)
    store = await open_store(settings)
    rows = unit_rows(30, 8, seed=9)
    marker = Path(settings.data_dir) / "log" / committed.NAME
    before_writes, acknowledged_at = len(synced), committed.read(marker)[0]
    await asyncio.gather(*(store.write([upsert("s", f"i{n}", rows[n])]) for n in range(30)))
    assert len(synced) == before_writes, "a write with INDEX_FSYNC=interval waited for an fsync"
    deadline = asyncio.get_running_loop().time() + 30
    while committed.read(marker)[0] == acknowledged_at:  # the periodic fsync moves it
        assert asyncio.get_running_loop().time() < deadline, "the periodic fsync never ran"
        await asyncio.sleep(0.02)
    assert len(synced) > before_writes
    await kill(store)
    reopened = await open_store(settings)
    assert sorted(reopened.spaces["s"].row_of) == sorted(f"i{n}" for n in range(30))
