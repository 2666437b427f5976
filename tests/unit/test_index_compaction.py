"""Replaced and deleted rows are reclaimed while the shard runs: a space's rows stay proportional to its live
items whatever the rewrites, searches stay exact (filters included) across a compaction, and what a
compaction leaves survives restarts."""

import json
from pathlib import Path

import numpy as np
import pytest

from services.index.records import Op
from services.index.store import IndexStore
from tests.unit.index_data import (
    Contents,
    OpenStore,
    apply_to,
    assert_contents,
    kill,
    store_settings,
    unit_rows,
    upsert,
)

_DIM = 16
_FLOOR = 50


async def _exact_top(
    store: IndexStore, expected: Contents, query: np.ndarray, k: int, colour: str = ""
) -> None:
    """The store's hits are the exact top k of `expected` (among items of `colour`, when given)."""
    allowed = [item_id for item_id, (_, _, payload, _) in expected.items() if not colour or colour in payload]
    scores = {item_id: float(expected[item_id][0] @ query) for item_id in allowed}
    best = sorted(allowed, key=lambda item_id: -scores[item_id])[:k]
    hits = await store.search("s", query, k, (), {"colour": colour} if colour else {})
    assert [hit.id for hit in hits] == best
    for hit in hits:
        assert hit.score == pytest.approx(scores[hit.id], abs=1e-5)
        assert hit.payload_json == expected[hit.id][2]


@pytest.mark.parametrize("engine", ["exact", "sq8"])
async def test_rewriting_the_same_ids_keeps_rows_bounded_and_searches_exact(
    tmp_path: Path, open_store: OpenStore, engine: str
) -> None:
    settings = store_settings(
        tmp_path,
        compact_min_retired=_FLOOR,
        ann_threshold=0 if engine == "exact" else 20,
        ann_engine="sq8",
        sq8_rerank=100,
    )
    store = await open_store(settings)
    rows = unit_rows(3000, _DIM, seed=1)
    expected: Contents = {}
    queries = unit_rows(5, _DIM, seed=2)
    most = 0
    for round_number in range(100):
        ops = [
            upsert(
                "s",
                f"i{(round_number * 7 + n) % 30}",
                rows[round_number * 30 + n],
                payload=json.dumps({"colour": ("red", "blue")[n % 2], "round": str(round_number)}),
            )
            for n in range(30)
        ]
        if round_number % 10 == 9:
            ops.append(Op("s", sorted(expected)[0]))
        await store.write(ops)
        apply_to(expected, ops)
        held = store.held("s")[0]
        most = max(most, held.count)
        if round_number % 25 == 24:
            for query in queries:
                await _exact_top(store, expected, query, 5)
                await _exact_top(store, expected, query, 3, colour="red")
    held = store.held("s")[0]
    assert held.engine.name == engine
    # 3,000 upserts of at most 30 ids: rows never pile up past the live items plus the floor plus a write
    assert most <= held.live + max(held.live, _FLOOR) + 31
    assert_contents(store, "s", expected)

    await kill(store)
    replayed = await open_store(settings)  # the whole log replayed: compacted on the way too
    assert replayed.held("s")[0].count <= 30 + _FLOOR + 31
    assert_contents(replayed, "s", expected)
    for query in queries:
        await _exact_top(replayed, expected, query, 5, colour="blue")
    await replayed.close()
    assert_contents(await open_store(settings), "s", expected)


async def test_deleting_most_items_compacts_and_keeps_the_rest_exact(
    tmp_path: Path, open_store: OpenStore
) -> None:
    settings = store_settings(tmp_path, compact_min_retired=_FLOOR)
    store = await open_store(settings)
    rows = unit_rows(400, _DIM, seed=3)
    ops = [
        upsert("s", f"i{n}", rows[n], payload=json.dumps({"colour": ("red", "blue")[n % 2]}))
        for n in range(400)
    ]
    await store.write(ops)
    expected: Contents = {}
    apply_to(expected, ops)
    deletes = [Op("s", f"i{n}") for n in range(400) if n % 10]
    await store.write(deletes)
    apply_to(expected, deletes)
    held = store.held("s")[0]
    assert held.live == 40 and held.count <= 40 + _FLOOR + 1
    for query in unit_rows(4, _DIM, seed=4):
        await _exact_top(store, expected, query, 10)
        await _exact_top(store, expected, query, 10, colour="red")
    for n in range(0, 400, 10):
        hits = await store.search("s", rows[n], 1, (), {})
        assert hits[0].id == f"i{n}" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    await store.close()
    assert_contents(await open_store(settings), "s", expected)


async def test_a_space_below_the_floor_is_not_compacted(tmp_path: Path, open_store: OpenStore) -> None:
    store = await open_store(store_settings(tmp_path, compact_min_retired=_FLOOR))
    rows = unit_rows(40, _DIM, seed=5)
    for n in range(40):
        await store.write([upsert("s", "same", rows[n])])
    assert store.held("s")[0].count == 40  # 39 retired rows < the floor of 50: not worth a rebuild
