"""Storage fault injection, in-process: a shard's data directory (several log segments, two snapshots, a
COMMITTED marker; left by a clean stop, or by a kill with a torn record at its end) gets bits flipped
and files cut short at seeded random offsets. After each fault the store either holds every acknowledged
item exactly (vector, kind, payload, model) or refuses to start naming a damaged file; never less,
never silently. After a refusal, salvage makes the directory load again with nothing but acknowledged
versions of items."""

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from services.index import salvage
from services.index.damage import Damaged
from services.index.records import Op, encode
from services.index.settings import IndexSettings
from services.index.store import IndexStore
from tests.storage_faults import Fault, inject
from tests.unit.index_data import Contents, apply_to, contents, kill, store_settings, unit_rows, until, upsert

_DIM = 8
_SPACES = ("s", "t")
_SEEDS = range(40)


@dataclass
class History:
    """What was acknowledged: each space's items at the end, and every version each id ever had."""

    settings: IndexSettings
    expected: dict[str, Contents]
    versions: dict[tuple[str, str], list[tuple[bytes, int, str, tuple[str, str]]]]


async def _write_history(directory: Path, stop: str) -> History:
    settings = store_settings(directory, snapshot_every_ops=25)
    store = IndexStore(settings)
    await store.open()
    rng = np.random.default_rng(7)
    rows = unit_rows(400, _DIM, seed=8)
    expected: dict[str, Contents] = {space: {} for space in _SPACES}
    versions: dict[tuple[str, str], list[tuple[bytes, int, str, tuple[str, str]]]] = {}
    row = 0
    for batch in range(8):
        ops: list[Op] = []
        for _ in range(30 if batch < 7 else 10):  # the last batch is left to the log
            space = _SPACES[int(rng.integers(2))]
            held = expected[space]
            if held and rng.random() < 0.15:
                ops.append(Op(space, sorted(held)[int(rng.integers(len(held)))]))
                continue
            item_id = f"{space}{int(rng.integers(60))}"
            payload = json.dumps({"batch": str(batch), "row": row})
            ops.append(upsert(space, item_id, rows[row], kind=1 + row % 3, payload=payload))
            versions.setdefault((space, item_id), []).append(
                (rows[row].tobytes(), 1 + row % 3, payload, ("model", "v1"))
            )
            row += 1
        for start in range(0, len(ops), 10):
            await store.write(ops[start : start + 10])
        for space in _SPACES:
            apply_to(expected[space], [op for op in ops if op.space == space])
        await until(
            lambda: (
                store._unsnapshotted < 25 and (store._snapshot_task is None or store._snapshot_task.done())
            )
        )
    if stop == "close":
        await store.close()
    else:
        await kill(store)
        last = max((Path(settings.data_dir) / "log").glob("*.log"))
        with last.open("ab") as file:  # a write the kill interrupted: never acknowledged
            file.write(encode(upsert("s", "torn", rows[399]))[:-9])
    return History(settings, expected, versions)


@pytest.fixture(scope="module", params=["close", "kill"])
async def history(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> History:
    return await _write_history(tmp_path_factory.mktemp(f"history-{request.param}"), request.param)


def _copy(history: History, directory: Path) -> IndexSettings:
    shutil.copytree(history.settings.data_dir, directory / "index")
    return history.settings.model_copy(update={"data_dir": str(directory / "index")})


async def _open(settings: IndexSettings) -> IndexStore:
    store = IndexStore(settings)
    await store.open()
    return store


def _assert_whole(store: IndexStore, history: History, faults: list[Fault]) -> None:
    for space in _SPACES:
        got = contents(store, space)
        want = history.expected[space]
        assert sorted(got) == sorted(want), faults
        for item_id, (vector, kind, payload, model) in want.items():
            got_vector, got_kind, got_payload, got_model = got[item_id]
            assert got_vector.tobytes() == vector.tobytes(), (item_id, faults)
            assert (got_kind, got_payload, got_model) == (kind, payload, model), (item_id, faults)


def _assert_only_acknowledged(store: IndexStore, history: History) -> None:
    """After a salvage: items may be lost (or an older version back), but none is made up."""
    for space in _SPACES:
        for item_id, (vector, kind, payload, model) in contents(store, space).items():
            assert (vector.tobytes(), kind, payload, model) in history.versions[(space, item_id)], item_id


async def test_after_any_fault_every_acknowledged_item_is_back_or_the_store_refuses_naming_the_file(
    history: History, tmp_path: Path
) -> None:
    outcomes: Counter[str] = Counter()
    for seed in _SEEDS:
        settings = _copy(history, tmp_path / str(seed))
        faults = inject(Path(settings.data_dir), seed)
        try:
            store = await _open(settings)
        except Damaged as refusal:
            assert any(str(fault.path) in str(refusal) for fault in faults), (seed, faults, str(refusal))
            outcomes["refused"] += 1
            salvage.salvage(Path(settings.data_dir))
            salvaged = await _open(settings)
            _assert_only_acknowledged(salvaged, history)
            await salvaged.close()
            continue
        _assert_whole(store, history, faults)
        for space in _SPACES:
            for item_id, (vector, *_rest) in list(history.expected[space].items())[:5]:
                hits = await store.search(space, vector, 1, (), {})
                assert hits[0].id == item_id, (seed, faults)
        await store.close()
        outcomes["whole"] += 1
    print(dict(outcomes))
    # both outcomes happen: the faults reach data the store needs, and data it can do without
    assert outcomes["refused"] >= 5 and outcomes["whole"] >= 5, outcomes


async def test_the_history_reloads_whole_without_faults(history: History, tmp_path: Path) -> None:
    """The oracle's baseline: with no fault the store loads exactly what was acknowledged (the torn record
    of a kill cut off), from a snapshot and the log after it."""
    settings = _copy(history, tmp_path)
    store = await _open(settings)
    _assert_whole(store, history, [])
    assert len(list((Path(settings.data_dir) / "snapshots").iterdir())) == 2
    assert len(list((Path(settings.data_dir) / "log").glob("*.log"))) >= 2
    await store.close()
