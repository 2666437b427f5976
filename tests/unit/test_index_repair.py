"""`python -m services.index verify DIR` and `salvage DIR` on damaged data directories: exact reports (file,
byte range, records), every intact record kept, damaged originals set aside, and a directory the shard
then loads."""

import subprocess
import sys
from pathlib import Path

import pytest

from services.index import committed, salvage, snapshot, verify, wal
from services.index.damage import Damaged
from services.index.records import MAGIC, SEAL, Op, encode
from services.index.settings import IndexSettings
from services.index.store import IndexStore
from tests.unit.index_data import (
    Contents,
    OpenStore,
    apply_to,
    assert_contents,
    kill,
    store_settings,
    unit_rows,
    until,
    upsert,
)

_DIM = 8


def _ops(first: int, count: int) -> list[Op]:
    rows = unit_rows(first + count, _DIM, seed=1)
    return [
        upsert("s", f"i{n % 25}", rows[n], payload=f'{{"n": "{n}"}}') for n in range(first, first + count)
    ]


async def _log_only(tmp_path: Path, open_store: OpenStore) -> tuple[IndexSettings, list[list[Op]]]:
    """Three segments of 10 acknowledged ops each (one write per op), no snapshot, the shard killed."""
    settings = store_settings(tmp_path)
    store = await open_store(settings)
    segments: list[list[Op]] = []
    for segment in range(3):
        ops = _ops(segment * 10, 10)
        for op in ops:
            await store.write([op])
        segments.append(ops)
        if segment < 2:
            store._log.roll()
    await kill(store)
    return settings, segments


def _log(settings: IndexSettings, segment: int) -> Path:
    return wal.segment_path(Path(settings.data_dir) / "log", segment)


def _offset_of(ops: list[Op], position: int) -> int:
    """Where record `position` of a segment holding `ops` starts."""
    return len(MAGIC) + sum(len(encode(op)) for op in ops[:position])


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))


def _files(directory: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def _expected(ops: list[Op]) -> Contents:
    expected: Contents = {}
    apply_to(expected, ops)
    return expected


def _verify_lines(data_dir: Path) -> tuple[verify.Verdict, list[str]]:
    verdict = verify.verify(data_dir)
    return verdict, verify.report(data_dir, verdict)


async def test_a_clean_directory_verifies_clean_and_salvage_changes_nothing(
    tmp_path: Path, open_store: OpenStore
) -> None:
    settings, _ = await _log_only(tmp_path, open_store)
    data_dir = Path(settings.data_dir)
    verdict, lines = _verify_lines(data_dir)
    assert verdict.clean and verdict.starts_from == 0 and verdict.records == 30
    assert lines[-1].startswith("clean: the shard starts from no snapshot")
    before = _files(data_dir)
    salvaged = salvage.salvage(data_dir)
    assert salvaged.lost == [] and salvaged.kept_records == 30
    assert (
        salvage.report(data_dir, salvaged)[-1] == "kept every intact record (30 in the log); nothing was lost"
    )
    assert _files(data_dir) == before


async def test_a_damaged_record_body_loses_exactly_that_record(tmp_path: Path, open_store: OpenStore) -> None:
    settings, segments = await _log_only(tmp_path, open_store)
    data_dir = Path(settings.data_dir)
    damaged = _log(settings, 1)
    start, end = _offset_of(segments[1], 4), _offset_of(segments[1], 5)
    _flip(damaged, start + 30)

    verdict, lines = _verify_lines(data_dir)
    assert [str(problem) for problem in verdict.problems] == [
        f"{damaged} at byte {start}: record checksum mismatch"
    ]
    assert verdict.starts_from is None
    assert f"  DAMAGED {damaged} at byte {start}: record checksum mismatch" in lines
    assert "the shard refuses to start" in lines[-1]
    with pytest.raises(Damaged, match=str(damaged)):
        await open_store(settings)

    salvaged = salvage.salvage(data_dir)
    assert [(loss.path, loss.start, loss.end, loss.records, loss.exact) for loss in salvaged.lost] == [
        (damaged, start, end, 1, True)
    ]
    report = salvage.report(data_dir, salvaged)
    assert (
        f"  LOST {damaged} bytes {start}-{end - 1} ({end - start} bytes): record checksum mismatch; lost 1 record"
        in report
    )
    assert report[-1].endswith(
        f"lost {end - start} bytes of log: 1 records counted exactly, plus 0 places whose count is unknown"
    )
    original = damaged.with_name(f"{damaged.name}.damaged")
    assert len(original.read_bytes()) == len(damaged.read_bytes()) + end - start  # set aside as it was
    assert verify.verify(data_dir).clean
    kept = segments[0] + segments[1][:4] + segments[1][5:] + segments[2]
    assert_contents(await open_store(settings), "s", _expected(kept))


async def test_a_damaged_frame_header_resynchronises_at_the_next_intact_frame(
    tmp_path: Path, open_store: OpenStore
) -> None:
    settings, segments = await _log_only(tmp_path, open_store)
    data_dir = Path(settings.data_dir)
    damaged = _log(settings, 0)
    start, end = _offset_of(segments[0], 2), _offset_of(segments[0], 3)
    _flip(damaged, start + 1)  # the length field
    assert [problem.offset for problem in verify.verify(data_dir).problems] == [start]

    salvaged = salvage.salvage(data_dir)
    assert [(loss.path, loss.start, loss.end, loss.records, loss.exact) for loss in salvaged.lost] == [
        (damaged, start, end, 1, False)
    ]
    assert "at least 1 record(s)" in str(salvaged.lost[0])
    assert damaged.read_bytes().endswith(SEAL)  # not the last segment: sealed again
    kept = segments[0][:2] + segments[0][3:] + segments[1] + segments[2]
    assert_contents(await open_store(settings), "s", _expected(kept))


async def test_a_missing_middle_segment_gets_a_placeholder_and_is_reported(
    tmp_path: Path, open_store: OpenStore
) -> None:
    settings, segments = await _log_only(tmp_path, open_store)
    data_dir = Path(settings.data_dir)
    missing = _log(settings, 1)
    missing.unlink()
    assert [str(problem) for problem in verify.verify(data_dir).problems] == [
        f"{missing}: missing: the log must run without gaps from segment 0"
    ]
    salvaged = salvage.salvage(data_dir)
    assert [(loss.path, loss.records, loss.exact) for loss in salvaged.lost] == [(missing, 0, False)]
    assert "lost an unknown number of records" in str(salvaged.lost[0])
    assert missing.read_bytes() == MAGIC + SEAL
    assert_contents(await open_store(settings), "s", _expected(segments[0] + segments[2]))


@pytest.mark.parametrize("inside", [False, True])
async def test_a_middle_segment_cut_short_is_sealed_again_and_the_cut_reported(
    tmp_path: Path, open_store: OpenStore, inside: bool
) -> None:
    settings, segments = await _log_only(tmp_path, open_store)
    data_dir = Path(settings.data_dir)
    path = _log(settings, 0)
    boundary = _offset_of(segments[0], 7)
    keep = boundary + 5 if inside else boundary
    with path.open("r+b") as file:
        file.truncate(keep)
    assert [problem.offset for problem in verify.verify(data_dir).problems] == [boundary]
    salvaged = salvage.salvage(data_dir)
    lost = [(loss.path, loss.start, loss.end, loss.records, loss.exact) for loss in salvaged.lost]
    if inside:
        assert lost == [(path, boundary, keep, 1, False)]
        assert "ends inside a record" in str(salvaged.lost[0])
    else:
        assert lost == [(path, keep, None, 0, False)]
        assert "ends without its seal" in str(salvaged.lost[0])
    assert path.read_bytes().endswith(SEAL)
    assert_contents(await open_store(settings), "s", _expected(segments[0][:7] + segments[1] + segments[2]))


async def test_a_log_cut_short_below_the_marker_reports_the_acknowledged_bytes_it_lost(
    tmp_path: Path, open_store: OpenStore
) -> None:
    settings, segments = await _log_only(tmp_path, open_store)
    data_dir = Path(settings.data_dir)
    last = _log(settings, 2)
    size = last.stat().st_size
    cut = _offset_of(segments[2], 7) + 5
    with last.open("r+b") as file:
        file.truncate(cut)
    boundary = _offset_of(segments[2], 7)
    assert [str(problem) for problem in verify.verify(data_dir).problems] == [
        f"{last} at byte {boundary}: intact only up to here, but {size} bytes were acknowledged: the log was cut short"
    ]
    salvaged = salvage.salvage(data_dir)
    assert [(loss.path, loss.start, loss.end, loss.exact) for loss in salvaged.lost] == [
        (last, boundary, size, False)
    ]
    assert committed.read(data_dir / "log" / committed.NAME)[0] == committed.Committed(2, boundary)
    assert_contents(await open_store(settings), "s", _expected(segments[0] + segments[1] + segments[2][:7]))


async def test_a_damaged_marker_is_reported_by_verify_and_rewritten_by_salvage(
    tmp_path: Path, open_store: OpenStore
) -> None:
    settings, _ = await _log_only(tmp_path, open_store)
    data_dir = Path(settings.data_dir)
    marker = data_dir / "log" / committed.NAME
    _flip(marker, 3)
    verdict, lines = _verify_lines(data_dir)
    assert [str(problem) for problem in verdict.problems] == [
        f"{marker}: damaged (checksum mismatch); ignored"
    ]
    assert verdict.starts_from == 0 and "nothing the shard needs" in lines[-1]
    salvaged = salvage.salvage(data_dir)
    assert salvaged.lost == []
    assert committed.read(marker) == (committed.Committed(2, _log(settings, 2).stat().st_size), "")
    assert verify.verify(data_dir).clean


async def _with_snapshots(tmp_path: Path, open_store: OpenStore) -> tuple[IndexSettings, Contents, Contents]:
    """Spaces "s" and "t", four snapshots taken (two kept, the log before the older one deleted), then
    more writes in the log, the shard stopped."""
    settings = store_settings(tmp_path, snapshot_every_ops=10)
    store = await open_store(settings)
    rows = unit_rows(80, _DIM, seed=2)
    s: Contents = {}
    t: Contents = {}
    for batch in range(5):  # the last one, 5 ops, takes no snapshot
        ops = [upsert("s", f"s{batch}-{n}", rows[batch * 16 + n]) for n in range(12 if batch < 4 else 4)]
        ops += [upsert("t", f"t{batch}-{n}", rows[batch * 16 + 12 + n]) for n in range(4 if batch < 4 else 1)]
        await store.write(ops)
        apply_to(s, [op for op in ops if op.space == "s"])
        apply_to(t, [op for op in ops if op.space == "t"])
        await _wait_snapshot(store)
    await kill(store)
    return settings, s, t


async def _wait_snapshot(store: IndexStore) -> None:
    await until(
        lambda: store._unsnapshotted < 10 and (store._snapshot_task is None or store._snapshot_task.done())
    )


async def test_a_damaged_newest_snapshot_is_set_aside_and_nothing_is_lost(
    tmp_path: Path, open_store: OpenStore
) -> None:
    settings, s, t = await _with_snapshots(tmp_path, open_store)
    data_dir = Path(settings.data_dir)
    directory = data_dir / "snapshots"
    older, newest = snapshot.complete(directory)
    _flip(snapshot.folder_of(directory, newest) / snapshot.DATA, 10)
    verdict = verify.verify(data_dir)
    assert [problem.path for problem in verdict.problems] == [
        snapshot.folder_of(directory, newest) / snapshot.DATA
    ]
    assert verdict.starts_from == older
    salvaged = salvage.salvage(data_dir)
    assert salvaged.lost == []
    assert any(
        action.startswith(f"set aside snapshot {snapshot.folder_of(directory, newest)}")
        for action in salvaged.actions
    )
    assert snapshot.complete(directory) == [older]
    store = await open_store(settings)
    assert_contents(store, "s", s)
    assert_contents(store, "t", t)


async def test_with_no_intact_snapshot_the_intact_spaces_of_the_newest_are_kept(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """Both snapshots damaged in space "t"'s vectors, the log before the older one gone: "s" is kept whole
    (the newest snapshot's copy and the log after it); "t" loses what only the snapshots held."""
    settings, s, t = await _with_snapshots(tmp_path, open_store)
    data_dir = Path(settings.data_dir)
    directory = data_dir / "snapshots"
    newest = snapshot.complete(directory)[-1]
    for segment in snapshot.complete(directory):
        folder = snapshot.folder_of(directory, segment)
        manifest = snapshot._manifest(folder)
        region = next(space for space in manifest["spaces"] if space["space"] == "t")["regions"]["vectors"]
        _flip(folder / snapshot.DATA, region["offset"] + 1)
    with pytest.raises(Damaged):
        await open_store(settings)

    salvaged = salvage.salvage(data_dir)
    lost = [str(loss) for loss in salvaged.lost]
    assert len(lost) == 1 and "'t'" in lost[0] and "that space is lost" in lost[0]
    assert snapshot.complete(directory) == [newest]
    store = await open_store(settings)
    assert_contents(store, "s", s)
    logged_t = {item_id: value for item_id, value in t.items() if item_id.startswith("t4-")}
    assert_contents(store, "t", logged_t)  # only the write after the newest snapshot


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.index", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_commands_exit_0_when_clean_and_1_when_damaged_or_lossy(
    tmp_path: Path, open_store: OpenStore
) -> None:
    settings, segments = await _log_only(tmp_path, open_store)
    data_dir = Path(settings.data_dir)
    clean = _run("verify", str(data_dir))
    assert clean.returncode == 0 and "clean" in clean.stdout
    _flip(_log(settings, 2), _offset_of(segments[2], 9) + 20)
    damaged = _run("verify", str(data_dir))
    assert damaged.returncode == 1 and "record checksum mismatch" in damaged.stdout
    salvaged = _run("salvage", str(data_dir))
    assert salvaged.returncode == 1 and "LOST" in salvaged.stdout
    again = _run("verify", str(data_dir))
    assert again.returncode == 0, again.stdout
    usage = _run("check", str(data_dir))
    assert usage.returncode == 2 and "verify" in usage.stderr
