"""The index store never serves with less than was acknowledged: checksummed snapshots and their fallback,
retention, refusals naming the damaged file, an upgrade from the first on-disk format, a snapshot cost
independent of the number of spaces, a shutdown that keeps its time budget, and a full disk."""

import asyncio
import errno
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.index import snapshot, wal
from services.index.damage import Damaged
from services.index.records import Op, body, frame_v1
from services.index.settings import IndexSettings
from services.index.store import IndexStore
from tests.unit.index_data import (
    Contents,
    OpenStore,
    apply_to,
    assert_contents,
    kill,
    segment_numbers,
    snapshot_names,
    store_settings,
    unit_rows,
    until,
    upsert,
)

_DIM = 8


async def _settled(store: IndexStore) -> None:
    """Wait for the snapshot a write made due (the writer starts it after acknowledging the write) to be
    written, read back, and the files it replaces deleted."""
    settings = store._settings

    def settled() -> bool:
        due = (
            store._unsnapshotted >= settings.snapshot_every_ops
            or store._unsnapshotted_bytes >= settings.snapshot_log_bytes
        )
        return not due and (store._snapshot_task is None or store._snapshot_task.done())

    await until(settled)


async def _history(store: IndexStore, batches: int, seed: int) -> tuple[Contents, Contents]:
    """`batches` writes of 12 ops to spaces "s" and "t" (upserts, overwrites, deletes), each followed by
    the snapshot it triggers (at 10 ops), then 5 more ops that no snapshot covers. Returns what each space
    holds."""
    rows = unit_rows(batches * 12 + 5, _DIM, seed)
    expected: dict[str, Contents] = {"s": {}, "t": {}}
    row = 0
    for batch in range(batches + 1):
        ops: list[Op] = []
        for n in range(12 if batch < batches else 5):
            space = "t" if n % 5 == 4 else "s"
            if n % 6 == 5 and expected[space]:
                ops.append(Op(space, sorted(expected[space])[0]))
            else:
                item_id = f"i{(batch * 7 + n) % 40}"
                ops.append(
                    upsert(space, item_id, rows[row], kind=1 + n % 3, payload=json.dumps({"b": str(batch)}))
                )
            row += 1
        await store.write(ops)
        for space, held in expected.items():
            apply_to(held, [op for op in ops if op.space == space])
        await _settled(store)
    return expected["s"], expected["t"]


async def _filled(
    tmp_path: Path, open_store: OpenStore, batches: int = 4, stop: str = "close", **overrides: Any
) -> tuple[IndexSettings, Contents, Contents]:
    settings = store_settings(tmp_path, snapshot_every_ops=10, **overrides)
    store = await open_store(settings)
    s, t = await _history(store, batches, seed=1)
    if stop == "close":
        await store.close()
    else:
        await kill(store)
    return settings, s, t


def _files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


def _snapshot_dir(settings: IndexSettings) -> Path:
    return Path(settings.data_dir) / "snapshots"


async def test_the_newest_two_snapshots_are_kept_with_the_log_from_the_older_ones_segment(
    tmp_path: Path, open_store: OpenStore
) -> None:
    settings = store_settings(tmp_path, snapshot_every_ops=10)
    store = await open_store(settings)
    rows = unit_rows(60, _DIM, seed=2)
    expected: Contents = {}
    written: list[int] = []
    for batch in range(5):
        ops = [upsert("s", f"i{batch}-{n}", rows[batch * 12 + n]) for n in range(12)]
        await store.write(ops)
        apply_to(expected, ops)
        await _settled(store)
        written.append(store._log.segment)
        kept = written[-2:]
        assert snapshot_names(settings) == [f"{segment:012d}" for segment in kept]
        # the log from the older kept snapshot's segment on (from 0 while there is only one)
        first = kept[0] if len(kept) == 2 else 0
        assert segment_numbers(settings) == list(range(first, written[-1] + 1))
    await store.close()
    assert_contents(await open_store(settings), "s", expected)


async def test_older_snapshots_stay_until_a_newer_one_reads_back_intact(
    tmp_path: Path, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings, _, _ = await _filled(tmp_path, open_store)
    before_snapshots, before_segments = snapshot_names(settings), segment_numbers(settings)
    store = await open_store(settings)
    monkeypatch.setattr(snapshot, "read_back", lambda folder, deadline: [snapshot.Problem(folder, 0, "test")])
    rows = unit_rows(12, _DIM, seed=3)
    with caplog.at_level(logging.ERROR, logger="index.store"):
        await store.write([upsert("s", f"late{n}", rows[n]) for n in range(12)])
        await _settled(store)
    assert "read back damaged" in caplog.text
    newest = store._log.segment
    # the new one is set aside; nothing older was deleted
    assert snapshot_names(settings) == [*before_snapshots, f"{newest:012d}.damaged"]
    assert segment_numbers(settings)[: len(before_segments)] == before_segments


# --- a damaged snapshot: the one before it and the log, or a refusal naming the file --------------------


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "delete":
        path.unlink()
    elif how.startswith("truncate"):
        path.write_bytes(bytes(data[: int(len(data) * float(how.split("-")[1]))]))
    else:
        data[int(len(data) * float(how.split("-")[1]))] ^= 0x20
        path.write_bytes(bytes(data))


_DAMAGE = ["flip-0.0", "flip-0.3", "flip-0.999", "truncate-0.0", "truncate-0.5", "truncate-0.99", "delete"]


@pytest.mark.parametrize("how", _DAMAGE)
@pytest.mark.parametrize("name", [snapshot.DATA, snapshot.MANIFEST])
@pytest.mark.parametrize("stop", ["close", "kill"])
async def test_a_damaged_newest_snapshot_falls_back_to_the_one_before_and_the_log(
    tmp_path: Path, open_store: OpenStore, caplog: pytest.LogCaptureFixture, name: str, how: str, stop: str
) -> None:
    settings, s, t = await _filled(tmp_path, open_store, stop=stop)
    directory = _snapshot_dir(settings)
    older, newest = snapshot.complete(directory)
    damaged = snapshot.folder_of(directory, newest) / name
    _damage(damaged, how)

    with caplog.at_level(logging.ERROR, logger="index.recovery"):
        store = await open_store(settings)
    assert_contents(store, "s", s)
    assert_contents(store, "t", t)
    assert str(damaged) in caplog.text
    assert snapshot.complete(directory) == [older]
    assert (directory / f"{newest:012d}.damaged").is_dir()  # set aside, not deleted


@pytest.mark.parametrize("name", [snapshot.DATA, snapshot.MANIFEST])
async def test_when_no_snapshot_and_log_can_rebuild_the_state_the_store_refuses_naming_the_file(
    tmp_path: Path, open_store: OpenStore, name: str
) -> None:
    """Both kept snapshots damaged, and the log before the older one deleted: never start with less."""
    settings, _, _ = await _filled(tmp_path, open_store)
    directory = _snapshot_dir(settings)
    assert segment_numbers(settings)[0] > 0
    listing = _files(Path(settings.data_dir))
    damaged = [snapshot.folder_of(directory, segment) / name for segment in snapshot.complete(directory)]
    for path in damaged:
        _damage(path, "flip-0.5")
    contents_before = {path: path.read_bytes() for path in listing}

    with pytest.raises(Damaged) as raised:
        await open_store(settings)
    message = str(raised.value)
    for path in damaged:
        assert str(path) in message
    assert "python -m services.index salvage" in message
    # a refusal changes nothing on disk
    assert _files(Path(settings.data_dir)) == listing
    assert {path: path.read_bytes() for path in listing} == contents_before


async def test_a_damaged_snapshot_with_the_whole_log_behind_it_is_rebuilt_from_the_log(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """One snapshot only (so the log from segment 0 is all kept): damaged, the log alone rebuilds it."""
    settings, s, t = await _filled(tmp_path, open_store, batches=1, stop="kill")
    directory = _snapshot_dir(settings)
    assert segment_numbers(settings)[0] == 0
    for segment in snapshot.complete(directory):
        _damage(snapshot.folder_of(directory, segment) / snapshot.DATA, "flip-0.5")
    store = await open_store(settings)
    assert_contents(store, "s", s)
    assert_contents(store, "t", t)


async def test_damaged_vectors_never_load(tmp_path: Path, open_store: OpenStore) -> None:
    """The attack that loaded silently before: a float's exponent flipped to 1e38 in the vectors."""
    settings, s, _ = await _filled(tmp_path, open_store)
    directory = _snapshot_dir(settings)
    newest = snapshot.complete(directory)[-1]
    manifest = json.loads(
        (snapshot.folder_of(directory, newest) / snapshot.MANIFEST).read_bytes().split(b"\n")[1]
    )
    vectors = next(space for space in manifest["spaces"] if space["space"] == "s")["regions"]["vectors"]
    data_path = snapshot.folder_of(directory, newest) / snapshot.DATA
    data = bytearray(data_path.read_bytes())
    data[vectors["offset"] + 3] = 0x7E
    data_path.write_bytes(bytes(data))
    problems = snapshot.check(snapshot.folder_of(directory, newest))
    assert [(problem.path, problem.offset) for problem in problems] == [(data_path, vectors["offset"])]
    assert "'s'" in problems[0].what and "vectors" in problems[0].what
    assert_contents(await open_store(settings), "s", s)


async def test_a_snapshot_is_two_files_and_a_fixed_number_of_fsyncs_whatever_the_spaces(
    tmp_path: Path, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    counts = {}
    for spaces in (3, 300):
        settings = store_settings(tmp_path / str(spaces))
        store = await open_store(settings)
        rows = unit_rows(spaces, _DIM, seed=4)
        await store.write([upsert(f"space-{n}", "only", rows[n]) for n in range(spaces)])
        fsyncs = 0

        def counting(fd: int) -> None:
            nonlocal fsyncs
            fsyncs += 1
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", counting)
        await store.close()
        monkeypatch.setattr(os, "fsync", real_fsync)
        (folder,) = [path for path in _snapshot_dir(settings).iterdir()]
        assert sorted(path.name for path in folder.iterdir()) == sorted([snapshot.DATA, snapshot.MANIFEST])
        counts[spaces] = fsyncs
        reopened = await open_store(settings)
        assert len(reopened.held()) == spaces
    assert counts[3] == counts[300]


# --- shutdown within its budget ---------------------------------------------------------------------------


async def test_close_without_a_snapshot_budget_leaves_the_log_to_replay(
    tmp_path: Path, open_store: OpenStore
) -> None:
    settings = store_settings(tmp_path, close_snapshot_s=0)
    store = await open_store(settings)
    rows = unit_rows(20, _DIM, seed=5)
    ops = [upsert("s", f"i{n}", rows[n]) for n in range(20)]
    await store.write(ops)
    await store.close()
    assert snapshot_names(settings) == []
    expected: Contents = {}
    apply_to(expected, ops)
    reopened = await open_store(settings)
    assert reopened._unsnapshotted == 20
    assert_contents(reopened, "s", expected)


async def test_a_snapshot_past_the_close_budget_is_given_up_and_nothing_is_lost(
    tmp_path: Path, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot in progress when close() is called (here one that would take a minute) gets
    INDEX_CLOSE_SNAPSHOT_S, then is given up; close() returns and the log still holds everything."""
    settings = store_settings(tmp_path, snapshot_every_ops=10, close_snapshot_s=0.2)
    store = await open_store(settings)
    real_write = snapshot.write
    started = threading.Event()

    def slow_write(directory: Path, segment: int, states: Any, deadline: snapshot.Deadline) -> Path:
        started.set()
        until = time.monotonic() + 60
        while time.monotonic() < until:
            deadline.check()
            time.sleep(0.01)
        return real_write(directory, segment, states, deadline)

    monkeypatch.setattr(snapshot, "write", slow_write)
    rows = unit_rows(12, _DIM, seed=6)
    ops = [upsert("s", f"i{n}", rows[n]) for n in range(12)]
    await store.write(ops)  # 12 ops >= 10: a snapshot starts
    await asyncio.to_thread(started.wait, 30)
    began = time.monotonic()
    await store.close()
    assert time.monotonic() - began < 30  # not the minute the snapshot wanted
    assert [name for name in snapshot_names(settings) if not name.startswith(".tmp-")] == []
    expected: Contents = {}
    apply_to(expected, ops)
    monkeypatch.setattr(snapshot, "write", real_write)
    assert_contents(await open_store(settings), "s", expected)


async def test_a_snapshot_is_also_taken_when_the_log_grows_past_its_byte_bound(
    tmp_path: Path, open_store: OpenStore
) -> None:
    settings = store_settings(tmp_path, snapshot_log_bytes=4096)
    store = await open_store(settings)
    rows = unit_rows(30, _DIM, seed=7)
    payload = json.dumps({"p": "x" * 200})
    for n in range(30):  # about 290 bytes each: past 4096 bytes after 15 writes
        await store.write([upsert("s", f"i{n}", rows[n], payload=payload)])
        await _settled(store)
    assert snapshot_names(settings)  # the op bound (100,000) is far off
    assert store._unsnapshotted < 15


async def test_a_snapshot_is_taken_every_snapshot_interval_when_writes_are_unsnapshotted(
    tmp_path: Path, open_store: OpenStore
) -> None:
    settings = store_settings(tmp_path, snapshot_interval_s=0.2)  # the op and byte bounds are far off
    store = await open_store(settings)
    rows = unit_rows(3, _DIM, seed=12)
    await store.write([upsert("s", f"i{n}", rows[n]) for n in range(3)])

    def written() -> list[str]:
        return [name for name in snapshot_names(settings) if not name.startswith(".tmp-")]

    # Waited for with a deadline (the interval plus a loaded machine's margin), not assumed.
    await until(lambda: bool(written()), timeout=30)
    assert store._unsnapshotted == 0


async def test_concurrent_writes_share_one_fsync(
    tmp_path: Path, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes that arrive while an fsync runs are logged together and made durable by the next one fsync,
    each acknowledged only after it (INDEX_FSYNC=always)."""
    store = await open_store(store_settings(tmp_path))
    rows = unit_rows(21, _DIM, seed=13)
    real_fsync = os.fsync
    entered, release = threading.Event(), threading.Event()
    synced: list[int] = []

    def held_fsync(fd: int) -> None:
        synced.append(fd)
        if len(synced) == 1:  # the first write's fsync waits until the others are queued behind it
            entered.set()
            release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", held_fsync)
    first = asyncio.ensure_future(store.write([upsert("s", "i0", rows[0])]))
    assert await asyncio.to_thread(entered.wait, 30)
    rest = [asyncio.ensure_future(store.write([upsert("s", f"i{n}", rows[n])])) for n in range(1, 21)]
    await asyncio.sleep(0)  # each has queued its write
    assert not any(write.done() for write in [first, *rest])  # none acknowledged before its fsync
    release.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), 30)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert len(synced) == 2, f"{len(synced)} fsyncs for 21 writes"
    assert store.held("s")[0].live == 21


# --- an upgrade: data written by the first on-disk format ---------------------------------------------


def _write_format_1_snapshot(directory: Path, segment: int, states: dict[str, dict[str, Any]]) -> None:
    """A snapshot as shards wrote them before: a folder per space of .npy files and meta.json."""
    folder = directory / f"{segment:012d}"
    folder.mkdir(parents=True)
    manifest = []
    for number, (name, state) in enumerate(sorted(states.items())):
        space_dir = folder / str(number)
        space_dir.mkdir()
        for key in ("vectors", "kinds", "alive", "models"):
            np.save(space_dir / f"{key}.npy", state[key])
        if state["engine_state"] is not None:
            np.save(space_dir / "engine.npy", state["engine_state"])
        meta = {key: state[key] for key in ("ids", "payloads", "model_refs", "engine")}
        (space_dir / "meta.json").write_text(json.dumps(meta))
        manifest.append({"space": name, "folder": str(number)})
    (folder / "manifest.json").write_text(json.dumps(manifest))


async def _format_1_directory(tmp_path: Path, open_store: OpenStore) -> tuple[IndexSettings, Contents]:
    """What a shard of the first format left: a snapshot at segment 2 (the segments before it deleted),
    segment 2 in the first log format ending in a torn record."""
    source = await open_store(store_settings(tmp_path / "source", ann_threshold=20, ann_engine="sq8"))
    rows = unit_rows(60, _DIM, seed=8)
    before = [upsert("s", f"i{n}", rows[n], payload='{"c": "red"}') for n in range(30)]
    before += [Op("s", "i3"), upsert("s", "i4", rows[59])]
    await source.write(before)
    states = {held.name: held.state() for held in source.held()}
    await source.close()
    settings = store_settings(tmp_path, ann_threshold=20, ann_engine="sq8")
    data_dir = Path(settings.data_dir)
    _write_format_1_snapshot(data_dir / "snapshots", 2, states)
    after = [upsert("s", f"j{n}", rows[30 + n]) for n in range(10)] + [Op("s", "i5")]
    (data_dir / "log").mkdir(parents=True)
    segment = data_dir / "log" / f"{2:012d}.log"
    segment.write_bytes(b"".join(frame_v1(body(op)) for op in after) + frame_v1(body(after[0]))[:-7])
    expected: Contents = {}
    apply_to(expected, before + after)
    return settings, expected


async def test_a_data_directory_of_the_first_format_loads_whole_and_moves_on(
    tmp_path: Path, open_store: OpenStore
) -> None:
    settings, expected = await _format_1_directory(tmp_path, open_store)
    store = await open_store(settings)
    assert_contents(store, "s", expected)
    assert store.held("s")[0].engine.name == "sq8"
    rows = unit_rows(3, _DIM, seed=9)
    later = [upsert("s", f"k{n}", rows[n]) for n in range(3)]
    await store.write(later)
    apply_to(expected, later)
    await store.close()
    # the new snapshot is of the new format; the old one stays as the fallback until the next
    directory = _snapshot_dir(settings)
    assert snapshot.complete(directory)[0] == 2 and len(snapshot.complete(directory)) == 2
    assert (snapshot.folder_of(directory, snapshot.complete(directory)[1]) / snapshot.MANIFEST).exists()
    assert_contents(await open_store(settings), "s", expected)


@pytest.mark.parametrize(
    ("file", "how"),
    [("manifest.json", "truncate-0.5"), ("0/meta.json", "truncate-0.5"), ("0/vectors.npy", "exponent")],
)
async def test_a_damaged_snapshot_of_the_first_format_is_a_refusal_naming_the_file(
    tmp_path: Path, open_store: OpenStore, file: str, how: str
) -> None:
    """Before, a truncated meta.json stopped the shard with a bare JSONDecodeError naming no file, and
    damaged vectors loaded silently (scores of 1e38)."""
    settings, _ = await _format_1_directory(tmp_path, open_store)
    path = _snapshot_dir(settings) / f"{2:012d}" / file
    if how == "exponent":
        vectors = np.load(path)
        vectors[7, 0] = 1e38
        np.save(path, vectors)
    else:
        _damage(path, how)
    with pytest.raises(Damaged) as raised:
        await open_store(settings)
    assert str(path) in str(raised.value)


# --- a full disk -----------------------------------------------------------------------------------------


async def test_a_disk_full_during_a_snapshot_loses_nothing(
    tmp_path: Path, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ENOSPC while the snapshot's data is written: no snapshot, nothing deleted, writes go on."""
    settings, s, t = await _filled(tmp_path, open_store)
    store = await open_store(settings)
    before = snapshot_names(settings), segment_numbers(settings)
    real_fsync = os.fsync
    snapshots = str(_snapshot_dir(settings))

    def full(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(snapshots):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    rows = unit_rows(24, _DIM, seed=10)
    more = [upsert("s", f"full{n}", rows[n]) for n in range(12)]
    with caplog.at_level(logging.ERROR, logger="index.store"):
        await store.write(more)
        await _settled(store)
    assert "failed" in caplog.text
    apply_to(s, more)
    assert snapshot_names(settings) == before[0]
    assert segment_numbers(settings)[: len(before[1])] == before[1]
    monkeypatch.setattr(os, "fsync", real_fsync)
    after = [upsert("s", f"after{n}", rows[12 + n]) for n in range(3)]
    await store.write(after)
    apply_to(s, after)
    await kill(store)
    reopened = await open_store(settings)
    assert_contents(reopened, "s", s)
    assert_contents(reopened, "t", t)


async def test_a_disk_full_during_a_write_fails_only_that_write(
    tmp_path: Path, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = store_settings(tmp_path)
    store = await open_store(settings)
    rows = unit_rows(3, _DIM, seed=11)
    await store.write([upsert("s", "before", rows[0])])
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data)[:7])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wal.os, "write", full)
    with pytest.raises(Exception, match="could not store the write"):
        await store.write([upsert("s", "refused", rows[1])])
    monkeypatch.setattr(wal.os, "write", real_write)
    await store.write([upsert("s", "after", rows[2])])
    await kill(store)
    reopened = await open_store(settings)
    expected: Contents = {}
    apply_to(expected, [upsert("s", "before", rows[0]), upsert("s", "after", rows[2])])
    assert_contents(reopened, "s", expected)
