"""What the index store's tests share: settings, items, what a space holds, and a kill."""

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.index.records import Item, Op
from services.index.settings import IndexSettings
from services.index.store import IndexStore

OpenStore = Callable[[IndexSettings], Awaitable[IndexStore]]
# What a space holds, as a test compares it: id -> (vector, kind, payload, model ref).
Contents = dict[str, tuple[np.ndarray, int, str, tuple[str, str]]]


def store_settings(tmp_path: Path, **overrides: Any) -> IndexSettings:
    values: dict[str, Any] = {
        "data_dir": str(tmp_path / "index"),
        "fsync": "always",
        "snapshot_every_ops": 100_000,
        "snapshot_interval_s": 3600.0,
        "ann_threshold": 0,
    }
    values.update(overrides)
    return IndexSettings(**values)


def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def upsert(space: str, item_id: str, vector: np.ndarray, kind: int = 1, payload: str = "") -> Op:
    return Op(space, item_id, Item(item_id, vector.astype(np.float32), kind, payload, "model", "v1"))


def delete(space: str, item_id: str) -> Op:
    return Op(space, item_id)


def apply_to(expected: Contents, ops: Sequence[Op]) -> None:
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


def contents(store: IndexStore, space: str) -> Contents:
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


def assert_contents(store: IndexStore, space: str, expected: Contents) -> None:
    got = contents(store, space)
    assert sorted(got) == sorted(expected)
    for item_id, (vector, kind, payload, model) in expected.items():
        got_vector, got_kind, got_payload, got_model = got[item_id]
        np.testing.assert_array_equal(got_vector, vector, err_msg=item_id)
        assert (got_kind, got_payload, got_model) == (kind, payload, model), item_id
    assert store.held(space)[0].live == len(expected)


async def kill(store: IndexStore) -> None:
    """What a SIGKILL between two writes leaves on disk: the log as written, no final snapshot.

    The writer is stopped without the snapshot close() takes (a snapshot already in flight is let finish,
    so no background thread races the next open), and the log's descriptors are closed without an fsync
    or a last update of the COMMITTED marker."""
    store._queue.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*store._tasks[:1]), 10)
    for task in store._tasks[1:]:
        task.cancel()
    await asyncio.gather(*store._tasks[1:], return_exceptions=True)
    if store._snapshot_task is not None:
        await store._snapshot_task
    assert store._log._fd is not None and store._log._marker is not None
    os.close(store._log._fd)
    store._log._fd = None
    store._log._marker.close()
    store._log._marker = None


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def snapshot_names(settings: IndexSettings) -> list[str]:
    directory = Path(settings.data_dir) / "snapshots"
    return sorted(path.name for path in directory.iterdir()) if directory.is_dir() else []


def segment_numbers(settings: IndexSettings) -> list[int]:
    return sorted(int(path.stem) for path in (Path(settings.data_dir) / "log").glob("*.log"))
