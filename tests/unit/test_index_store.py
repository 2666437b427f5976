"""The index shard's store: durable writes, restarts (clean and killed), snapshots, engines and filters."""

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument
from services.index import space as space_module
from services.index.records import Item, Op
from services.index.settings import IndexSettings
from services.index.store import IndexStore

OpenStore = Callable[[IndexSettings], Awaitable[IndexStore]]
# What a space holds, as a test compares it: id -> (vector, kind, payload, model ref).
Contents = dict[str, tuple[np.ndarray, int, str, tuple[str, str]]]

_KINDS = (pb.INPUT_KIND_TEXT, pb.INPUT_KIND_IMAGE, pb.INPUT_KIND_USER)
_COLOURS = ("red", "green", "blue", "black")


def _settings(tmp_path: Path, **overrides: Any) -> IndexSettings:
    values: dict[str, Any] = {
        "data_dir": str(tmp_path / "index"),
        "fsync": "always",
        "snapshot_every_ops": 100_000,
        "snapshot_interval_s": 3600.0,
        "ann_threshold": 0,
    }
    values.update(overrides)
    return IndexSettings(**values)


def _unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _upsert(space: str, item_id: str, vector: np.ndarray, kind: int = 1, payload: str = "") -> Op:
    return Op(space, item_id, Item(item_id, vector.astype(np.float32), kind, payload, "model", "v1"))


def _delete(space: str, item_id: str) -> Op:
    return Op(space, item_id)


def _apply_to(expected: Contents, ops: Sequence[Op]) -> None:
    for op in ops:
        if op.item is None:
            expected.pop(op.item_id, None)
        else:
            item = op.item
            expected[op.item_id] = (
                item.vector,
                item.kind,
                item.payload_json,
                (item.model_id, item.model_version),
            )


def _contents(store: IndexStore, space: str) -> Contents:
    held = store.held(space)
    if not held:
        return {}
    state: dict[str, Any] = held[0].state()
    refs = state["model_refs"]
    out: Contents = {}
    for row in np.flatnonzero(state["alive"]).tolist():
        out[state["ids"][row]] = (
            state["vectors"][row],
            int(state["kinds"][row]),
            state["payloads"][row],
            tuple(refs[int(state["models"][row])]),
        )
    return out


def _assert_contents(store: IndexStore, space: str, expected: Contents) -> None:
    got = _contents(store, space)
    assert sorted(got) == sorted(expected)
    for item_id, (vector, kind, payload, model) in expected.items():
        got_vector, got_kind, got_payload, got_model = got[item_id]
        np.testing.assert_array_equal(got_vector, vector, err_msg=item_id)
        assert (got_kind, got_payload, got_model) == (kind, payload, model), item_id
    assert store.held(space)[0].live == len(expected)


async def _kill(store: IndexStore) -> None:
    """What a SIGKILL between two writes leaves on disk: the log as written, no final snapshot.

    The writer is stopped without the snapshot close() takes (a snapshot already in flight is let finish,
    so no background thread races the next open), and the log's descriptor is closed without an fsync."""
    store._queue.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*store._tasks[:1]), 10)
    for task in store._tasks[1:]:
        task.cancel()
    await asyncio.gather(*store._tasks[1:], return_exceptions=True)
    if store._snapshot_task is not None:
        await store._snapshot_task
    assert store._log._fd is not None
    os.close(store._log._fd)
    store._log._fd = None


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def _snapshots(settings: IndexSettings) -> list[str]:
    directory = Path(settings.data_dir) / "snapshots"
    return sorted(path.name for path in directory.iterdir()) if directory.is_dir() else []


def _segments(settings: IndexSettings) -> list[int]:
    return sorted(int(path.stem) for path in (Path(settings.data_dir) / "log").glob("*.log"))


@pytest.fixture
async def open_store() -> AsyncIterator[OpenStore]:
    """Open stores; those still open at the end (not closed or killed by the test) are closed."""
    opened: list[IndexStore] = []

    async def start(settings: IndexSettings) -> IndexStore:
        store = IndexStore(settings)
        await store.open()
        opened.append(store)
        return store

    yield start
    for store in opened:
        if store._log._fd is not None:
            await store.close()


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
    store = await open_store(_settings(tmp_path))
    rows = _unit_rows(20, 8, seed=1)
    await store.write(
        [_upsert("s", f"i{n}", rows[n], kind=_KINDS[n % 3], payload=f'{{"n": "{n}"}}') for n in range(20)]
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
    settings = _settings(tmp_path)
    store = await open_store(settings)
    rows = _unit_rows(60, 16, seed=2)
    expected: Contents = {}
    ops = [_upsert("s", f"i{n}", rows[n], kind=_KINDS[n % 3], payload=f'{{"n": "{n}"}}') for n in range(50)]
    ops += [_delete("s", f"i{n}") for n in range(0, 50, 7)]
    ops += [_upsert("s", f"i{n}", rows[50 + n], payload="") for n in range(1, 10, 3)]
    ops += [_upsert("other", "only", rows[59])]
    await store.write(ops)
    _apply_to(expected, [op for op in ops if op.space == "s"])
    _assert_contents(store, "s", expected)
    await store.close()
    assert _snapshots(settings) != []

    reopened = await open_store(settings)
    assert reopened._unsnapshotted == 0  # the close() snapshot covered everything: nothing replayed
    _assert_contents(reopened, "s", expected)
    _assert_contents(reopened, "other", {"only": (rows[59], 1, "", ("model", "v1"))})
    assert [held.name for held in reopened.held()] == ["other", "s"]
    assert reopened.dimension("s") == 16


async def test_a_killed_store_comes_back_from_the_log(tmp_path: Path, open_store: OpenStore) -> None:
    settings = _settings(tmp_path)
    store = await open_store(settings)
    rows = _unit_rows(40, 8, seed=3)
    expected: Contents = {}
    batches = [
        [
            _upsert("s", f"i{n}", rows[n], kind=_KINDS[n % 3], payload=f'{{"c": "{_COLOURS[n % 4]}"}}')
            for n in range(20)
        ],
        # duplicate ids in one write: the last one wins
        [
            _upsert("s", "dup", rows[20], payload='{"v": "first"}'),
            _upsert("s", "dup", rows[21], payload='{"v": "last"}'),
        ],
        [_upsert("s", "i3", rows[22], kind=pb.INPUT_KIND_ITEM, payload='{"v": "overwritten"}')],
        [_delete("s", "i4"), _delete("s", "never-there"), _upsert("s", "i4", rows[23]), _delete("s", "i4")],
        [_delete("s", "i5"), _upsert("s", "i5", rows[24], payload='{"v": "back"}')],
    ]
    # Concurrent writers share the writer's batches (and fsyncs); each is acknowledged once durable.
    await asyncio.gather(*(store.write(batch) for batch in batches))
    for batch in batches:
        _apply_to(expected, batch)
    more = [_upsert("s", f"j{n}", rows[25 + n]) for n in range(10)] + [_delete("s", "i0")]
    await store.write(more)
    _apply_to(expected, more)
    _assert_contents(store, "s", expected)
    assert _contents(store, "s")["dup"][2] == '{"v": "last"}'

    await _kill(store)
    assert _snapshots(settings) == []  # so all of it must come from the log

    reopened = await open_store(settings)
    _assert_contents(reopened, "s", expected)
    assert reopened._unsnapshotted == sum(map(len, batches)) + len(more)
    hits = await reopened.search("s", rows[21], 1, (), {})
    assert [(hit.id, hit.payload_json) for hit in hits] == [("dup", '{"v": "last"}')]
    near_deleted = await _search_ids(reopened, "s", rows[23], 40)
    assert len(near_deleted) == len(expected) and "i4" not in near_deleted


async def test_snapshot_then_log_replay(tmp_path: Path, open_store: OpenStore) -> None:
    settings = _settings(tmp_path, snapshot_every_ops=40)
    store = await open_store(settings)
    rows = _unit_rows(100, 8, seed=4)
    expected: Contents = {}
    first = [_upsert("s", f"i{n}", rows[n], payload=f'{{"n": "{n}"}}') for n in range(30)]
    await store.write(first)
    _apply_to(expected, first)
    assert _snapshots(settings) == [] and _segments(settings) == [0]

    second = [_upsert("s", f"i{n}", rows[n]) for n in range(30, 45)] + [_delete("s", "i1")]
    await store.write(second)  # 46 ops >= 40: the writer snapshots after this batch
    _apply_to(expected, second)
    await _until(lambda: store._snapshot_task is not None and store._snapshot_task.done())
    assert _snapshots(settings) == [f"{1:012d}"]
    assert _segments(settings) == [1]  # segment 0 is covered by the snapshot and was deleted

    third = [_upsert("s", f"i{n}", rows[n]) for n in range(45, 55)]
    third += [_delete("s", "i2"), _delete("s", "i40"), _upsert("s", "i3", rows[99], kind=pb.INPUT_KIND_IMAGE)]
    await store.write(third)  # 13 ops: no second snapshot
    _apply_to(expected, third)
    await _kill(store)
    assert _snapshots(settings) == [f"{1:012d}"] and _segments(settings) == [1]

    reopened = await open_store(settings)
    assert reopened._unsnapshotted == len(third)  # only what came after the snapshot was replayed
    _assert_contents(reopened, "s", expected)
    for n in (0, 10, 44, 54):
        assert (await _search_ids(reopened, "s", rows[n], 1)) == [f"i{n}"]
    assert (await _search_ids(reopened, "s", rows[99], 1)) == ["i3"]


async def test_a_half_written_snapshot_is_ignored(tmp_path: Path, open_store: OpenStore) -> None:
    settings = _settings(tmp_path)
    store = await open_store(settings)
    rows = _unit_rows(12, 8, seed=5)
    ops = [_upsert("s", f"i{n}", rows[n], payload='{"a": "b"}') for n in range(10)]
    await store.write(ops)
    await store.close()
    expected: Contents = {}
    _apply_to(expected, ops)
    complete = _snapshots(settings)
    assert len(complete) == 1

    junk = Path(settings.data_dir) / "snapshots" / f".tmp-{int(complete[0]) + 1:012d}"
    (junk / "0").mkdir(parents=True)
    (junk / "manifest.json").write_text('[{"space": "s", "folder": "0"}')  # cut short
    (junk / "0" / "vectors.npy").write_bytes(b"\x93NUMPY garbage")

    reopened = await open_store(settings)
    _assert_contents(reopened, "s", expected)

    later = [_upsert("s", "late", rows[11])]
    await reopened.write(later)
    await reopened.close()  # its snapshot removes the half-written one
    _apply_to(expected, later)
    assert not junk.exists()
    assert len(_snapshots(settings)) == 1
    _assert_contents(await open_store(settings), "s", expected)


async def test_claim_dimension(tmp_path: Path, open_store: OpenStore) -> None:
    settings = _settings(tmp_path)
    store = await open_store(settings)
    store.claim_dimension("s", 8, "items[0].vector")
    store.claim_dimension("s", 8, "items[1].vector")
    with pytest.raises(InvalidArgument, match=r"items\[2\]\.vector has 16 dimensions .* 's' holds 8"):
        store.claim_dimension("s", 16, "items[2].vector")
    store.claim_dimension("t", 16, "items[0].vector")  # another space has its own dimension
    await store.write([_upsert("s", "a", _unit_rows(1, 8, seed=6)[0])])
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
        ops.append(_upsert("s", f"i{n}", rows[n], kind=_KINDS[n % 3], payload=payload))
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
    settings = _settings(tmp_path, ann_threshold=threshold, ann_engine="sq8" if engine == "exact" else engine)
    store = await open_store(settings)
    rows = _unit_rows(300, 32, seed=7)
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
    moved = _unit_rows(20, 32, seed=8)
    overwritten = {f"i{n}": moved[position] for position, n in enumerate(range(1, 300, 15))}
    await store.write([_delete("s", item_id) for item_id in sorted(deleted)])
    await store.write([_upsert("s", item_id, vector) for item_id, vector in overwritten.items()])
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
    settings = _settings(tmp_path / "first", ann_threshold=200, ann_engine=engine)
    store = await open_store(settings)
    rows = _unit_rows(260, 32, seed=9)
    await store.write([_upsert("s", f"i{n}", rows[n]) for n in range(199)])
    assert store.held("s")[0].engine.name == "exact"
    await store.write([_upsert("s", "i199", rows[199])])
    assert store.held("s")[0].engine.name == engine
    await store.write([_upsert("s", f"i{n}", rows[n]) for n in range(200, 250)])
    queries = _unit_rows(5, 32, seed=10)
    before = [await _search_ids(store, "s", query, 10) for query in queries]
    for query, ids in zip(queries, before, strict=True):
        assert ids == [f"i{n}" for n in np.argsort(-(rows[:250] @ query))[:10]]
    await store.close()

    # from the snapshot: nothing was retired, so its serialised ANN index is reused as it was
    reopened = await open_store(settings)
    assert reopened.held("s")[0].engine.name == engine
    assert [await _search_ids(reopened, "s", query, 10) for query in queries] == before
    await reopened.write([_upsert("s", f"i{n}", rows[n]) for n in range(250, 260)])
    await _kill(reopened)

    # from the snapshot plus the replayed log
    again = await open_store(settings)
    assert again.held("s")[0].engine.name == engine
    assert again.held("s")[0].live == 260
    assert (await _search_ids(again, "s", rows[255], 1)) == ["i255"]

    # from the log alone: the switch happens during the replay; overwrites do not count towards it
    second = _settings(tmp_path / "second", ann_threshold=200, ann_engine=engine)
    fresh = await open_store(second)
    await fresh.write([_upsert("s", f"i{n}", rows[n]) for n in range(199)])
    await fresh.write([_upsert("s", "i0", rows[259])])  # 199 live items still
    assert fresh.held("s")[0].engine.name == "exact"
    await fresh.write([_upsert("s", f"i{n}", rows[n]) for n in range(199, 210)])
    assert fresh.held("s")[0].engine.name == engine
    await _kill(fresh)
    replayed = await open_store(second)
    assert _snapshots(second) == []
    assert replayed.held("s")[0].engine.name == engine
    assert replayed.held("s")[0].live == 210
    assert (await _search_ids(replayed, "s", rows[259], 1)) == ["i0"]

    # retired rows are dropped on load, which leaves fewer items than the threshold: exact again
    await replayed.write([_delete("s", f"i{n}") for n in range(20)])
    assert replayed.held("s")[0].engine.name == engine  # no switch back while running
    await replayed.close()
    shrunk = await open_store(second)
    assert shrunk.held("s")[0].live == 190
    assert shrunk.held("s")[0].engine.name == "exact"
