"""The index shard's append-only log: record framing, what may be cut (an incomplete last record) and what
is damage (everything else: a refusal naming the file and the offset), segments and their seals, the
COMMITTED marker, and segments of the first format."""

import errno
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from services.index import committed, wal
from services.index.damage import Damaged
from services.index.records import MAGIC, SEAL, Item, Op, body, encode, frame_v1, scan
from services.index.wal import AppendLog


def _unit(seed: int, dim: int = 8) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def _upsert(item_id: str, seed: int, space: str = "space", payload: str = '{"a": "b"}') -> Op:
    return Op(space, item_id, Item(item_id, _unit(seed), 2, payload, "model", "v1"))


def _assert_same_op(got: Op, want: Op) -> None:
    assert (got.space, got.item_id) == (want.space, want.item_id)
    if want.item is None:
        assert got.item is None
        return
    assert got.item is not None
    assert got.item.id == want.item.id
    assert got.item.kind == want.item.kind
    assert got.item.payload_json == want.item.payload_json
    assert (got.item.model_id, got.item.model_version) == (want.item.model_id, want.item.model_version)
    assert got.item.vector.dtype == np.float32
    np.testing.assert_array_equal(got.item.vector, want.item.vector)


def _assert_same_ops(got: list[Op], want: list[Op]) -> None:
    assert len(got) == len(want)
    for got_op, want_op in zip(got, want, strict=True):
        _assert_same_op(got_op, want_op)


def _ops(count: int, first: int = 0) -> list[Op]:
    """Upserts with a delete every fourth op, so both record types sit in the log."""
    return [
        Op("space", f"id-{n - 1}") if n % 4 == 3 else _upsert(f"id-{n}", seed=n, space="space")
        for n in range(first, first + count)
    ]


def _segment(directory: Path, segment: int = 0) -> Path:
    return directory / f"{segment:012d}.log"


def _write_segment(directory: Path, ops: list[Op], segment: int = 0) -> Path:
    """`ops` acknowledged (fsync'd, so the marker covers them) in segment `segment`, the log closed."""
    log = AppendLog(directory)
    log.open(segment)
    log.write(b"".join(map(encode, ops)), sync=True)
    log.close()
    return _segment(directory, segment)


def _with_unacknowledged(directory: Path, ops: list[Op], last: Op) -> tuple[Path, int]:
    """`ops` acknowledged, then `last` appended the way a kill mid-write leaves it (the marker does not
    cover it); returns the segment and where `last` starts."""
    path = _write_segment(directory, ops)
    start = path.stat().st_size
    with path.open("ab") as file:
        file.write(encode(last))
    return path, start


def _refusal(directory: Path, start: int = 0) -> Damaged:
    with pytest.raises(Damaged) as raised:
        AppendLog(directory).replay(start)
    return raised.value


def test_records_round_trip() -> None:
    ops = [
        _upsert("plain", 1),
        Op("space", "plain"),
        _upsert("日本語-ü-🙂", 2, space="espace-é", payload='{"titre": "été ☀"}'),
        Op("espace-é", "日本語-ü-🙂"),
        _upsert("no-payload", 3, payload=""),
        Op("space", "x", Item("x", _unit(4, dim=1))),  # 1-d, every default
    ]
    data = MAGIC + b"".join(map(encode, ops))
    found = scan(data)
    assert (found.version, found.end, found.damage, found.sealed) == (2, len(data), "", False)
    _assert_same_ops(found.ops, ops)
    assert found.ops[4].item is not None and found.ops[4].item.payload_json == ""
    assert found.ops[5].item is not None and found.ops[5].item.kind == 0
    assert found.ops[5].item.model_id == "" and found.ops[5].item.model_version == ""
    sealed = scan(data + SEAL)
    assert sealed.sealed and sealed.end == len(data) + len(SEAL) and len(sealed.ops) == len(ops)


def test_a_frame_with_valid_checksums_but_an_unknown_record_type_is_damage(tmp_path: Path) -> None:
    """Checksums that hold over a body that does not decode: damage, whatever its place."""
    bogus = bytes([9]) + b"\x00" * 8
    head = len(bogus).to_bytes(4, "little") + zlib.crc32(bogus).to_bytes(4, "little")
    path = _write_segment(tmp_path, [_upsert("a", 1)])
    at = path.stat().st_size
    with path.open("ab") as file:
        file.write(head + zlib.crc32(head).to_bytes(4, "little") + bogus)
    refusal = _refusal(tmp_path)
    assert [(problem.path, problem.offset) for problem in refusal.problems] == [(path, at)]
    assert "unknown record type 9" in str(refusal)
    assert path.stat().st_size == at + 12 + len(bogus)  # nothing was cut


def test_an_incomplete_last_record_is_cut_at_every_length_and_appending_works_after(tmp_path: Path) -> None:
    """A kill mid-write leaves any prefix of the last frame: header bytes, or header and part of the body."""
    ops, last = _ops(9), _upsert("torn", 77)
    size = len(encode(last))
    for keep in range(1, size):
        directory = tmp_path / str(keep)
        path, start = _with_unacknowledged(directory, ops, last)
        with path.open("r+b") as file:
            file.truncate(start + keep)
        log = AppendLog(directory)
        _assert_same_ops(log.replay(0), ops)
        assert path.stat().st_size == start, keep

        log.open(0)
        assert log.segment == 0
        appended = _upsert("after-the-tear", 99)
        log.write(encode(appended), sync=True)
        log.close()
        _assert_same_ops(AppendLog(directory).replay(0), [*ops, appended])


def test_a_flipped_bit_anywhere_in_the_last_frame_is_a_refusal_naming_the_file_and_the_frame(
    tmp_path: Path,
) -> None:
    """Every byte of the last frame, header fields included (length, body crc, header crc), and the body:
    never a cut, whether or not the marker covers the frame."""
    ops = _ops(6)
    last = len(encode(ops[-1]))
    for acknowledged in (True, False):
        for offset in range(last):
            directory = tmp_path / f"{acknowledged}-{offset}"
            if acknowledged:
                path = _write_segment(directory, ops)
                start = path.stat().st_size - last
            else:
                path, start = _with_unacknowledged(directory, ops[:-1], ops[-1])
            data = bytearray(path.read_bytes())
            data[start + offset] ^= 1 << (offset % 8)
            path.write_bytes(bytes(data))

            refusal = _refusal(directory)
            assert [(problem.path, problem.offset) for problem in refusal.problems] == [(path, start)], offset
            assert str(path) in str(refusal) and f"at byte {start}" in str(refusal)
            assert "python -m services.index salvage" in str(refusal)
            assert path.read_bytes() == bytes(data)  # untouched


def test_a_zero_filled_tail_is_cut_off(tmp_path: Path) -> None:
    """A crash can leave the file extended with zeros past the last write: zeros from the end of the last
    acknowledged record on, or from inside the unacknowledged one (its header written, its body not)."""
    ops = _ops(5)
    path = _write_segment(tmp_path / "after", ops)
    size = path.stat().st_size
    with path.open("ab") as file:
        file.write(b"\x00" * 64)
    _assert_same_ops(AppendLog(tmp_path / "after").replay(0), ops)
    assert path.stat().st_size == size

    last = _upsert("half", 50)
    for written in (4, 12, 20):  # the zeros start inside the header, right after it, inside the body
        directory = tmp_path / f"inside-{written}"
        path, start = _with_unacknowledged(directory, ops, last)
        data = bytearray(path.read_bytes())
        data[start + written :] = b"\x00" * (len(data) - start - written + 4096 - len(data) % 4096)
        path.write_bytes(bytes(data))
        _assert_same_ops(AppendLog(directory).replay(0), ops)
        assert path.stat().st_size == start


def test_non_zero_bytes_after_a_zeroed_stretch_are_damage(tmp_path: Path) -> None:
    ops = _ops(5)
    path = _write_segment(tmp_path, ops)
    size = path.stat().st_size
    with path.open("ab") as file:
        file.write(b"\x00" * 64 + b"\x01")
    assert [problem.offset for problem in _refusal(tmp_path).problems] == [size]


def test_an_intact_log_replays_everything_and_is_left_alone(tmp_path: Path) -> None:
    ops = _ops(12)
    path = _write_segment(tmp_path, ops)
    before = path.read_bytes()
    _assert_same_ops(AppendLog(tmp_path).replay(0), ops)
    assert path.read_bytes() == before


def _two_segments(directory: Path) -> tuple[list[Op], list[Op]]:
    first, second = _ops(6), _ops(3, first=6)
    log = AppendLog(directory)
    log.open(0)
    log.write(b"".join(map(encode, first)), sync=True)
    assert log.roll() == 1
    log.write(b"".join(map(encode, second)), sync=True)
    log.close()
    return first, second


def test_damage_in_a_segment_that_is_not_the_last_is_a_refusal(tmp_path: Path) -> None:
    _, second = _two_segments(tmp_path)
    first = _segment(tmp_path, 0)
    data = bytearray(first.read_bytes())
    target = len(MAGIC) + len(encode(_ops(1)[0])) + 20  # inside the second record
    data[target] ^= 0xFF
    first.write_bytes(bytes(data))

    refusal = _refusal(tmp_path)
    second_record = len(MAGIC) + len(encode(_ops(1)[0]))
    assert [(problem.path, problem.offset) for problem in refusal.problems] == [(first, second_record)]
    assert first.read_bytes() == bytes(data)  # nothing is cut off a middle segment
    _assert_same_ops(AppendLog(tmp_path).replay(1), second)  # the segments after it are readable alone


@pytest.mark.parametrize("cut", ["at-a-record-boundary", "inside-a-record", "the-seal"])
def test_a_middle_segment_cut_short_is_a_refusal(tmp_path: Path, cut: str) -> None:
    """A segment that is not the last always ends with its seal: without it, it lost records at its end
    even when it ends exactly between two records."""
    first, _ = _two_segments(tmp_path)
    path = _segment(tmp_path, 0)
    size = path.stat().st_size
    boundary = size - len(SEAL) - len(encode(first[-1]))
    keep = {"at-a-record-boundary": boundary, "inside-a-record": boundary + 5, "the-seal": size - 1}[cut]
    with path.open("r+b") as file:
        file.truncate(keep)
    refusal = _refusal(tmp_path)
    assert [problem.path for problem in refusal.problems] == [path]
    assert refusal.problems[0].offset == (size - len(SEAL) if cut == "the-seal" else boundary)


def test_a_missing_segment_is_a_refusal(tmp_path: Path) -> None:
    _two_segments(tmp_path)
    log = AppendLog(tmp_path)
    log.open(0)
    log.roll()
    log.write(encode(_upsert("late", 5)), sync=True)
    log.close()
    _segment(tmp_path, 1).unlink()
    refusal = _refusal(tmp_path)
    assert [problem.path for problem in refusal.problems] == [_segment(tmp_path, 1)]
    assert "missing" in str(refusal)
    # a snapshot's own segment must exist too
    assert [problem.path for problem in _refusal(tmp_path, start=1).problems] == [_segment(tmp_path, 1)]


def test_a_log_shorter_than_the_committed_marker_is_a_refusal(tmp_path: Path) -> None:
    """A cut at a record boundary, or inside the last record, of records the marker says were acknowledged."""
    ops = _ops(8)
    path = _write_segment(tmp_path, ops)
    size = path.stat().st_size
    for keep in (size - len(encode(ops[-1])), size - 3, len(MAGIC), 3):
        data = path.read_bytes()
        with path.open("r+b") as file:
            file.truncate(keep)
        refusal = _refusal(tmp_path)
        assert [problem.path for problem in refusal.problems] == [path], keep
        assert f"{size} bytes were acknowledged" in str(refusal)
        path.write_bytes(data)
    _assert_same_ops(AppendLog(tmp_path).replay(0), ops)


def test_a_missing_last_segment_that_the_marker_names_is_a_refusal(tmp_path: Path) -> None:
    _two_segments(tmp_path)
    _segment(tmp_path, 1).unlink()
    refusal = _refusal(tmp_path)
    assert [problem.path for problem in refusal.problems] == [_segment(tmp_path, 1)]
    assert "acknowledged" in str(refusal)


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "garbage"])
def test_a_damaged_marker_is_reported_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    ops = _ops(7)
    _write_segment(tmp_path, ops)
    marker = tmp_path / committed.NAME
    data = bytearray(marker.read_bytes())
    if damage == "flip":
        data[9] ^= 0x10
    elif damage == "truncate":
        data = data[:10]
    elif damage == "extend":
        data += b"\x00"
    else:
        data = bytearray(b"x" * committed.SIZE)
    marker.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="index.wal"):
        log = AppendLog(tmp_path)
        _assert_same_ops(log.replay(0), ops)
    assert str(marker) in caplog.text and "damaged" in caplog.text
    log.open(0)  # and rewritten, valid again, as soon as the log is open
    log.close()
    mark, wrong = committed.read(marker)
    assert wrong == "" and mark == committed.Committed(0, _segment(tmp_path).stat().st_size)


def test_the_marker_moves_only_once_writes_are_fsynced(tmp_path: Path) -> None:
    """INDEX_FSYNC=interval: a write not yet fsync'd is not acknowledged; sync() makes it so."""
    log = AppendLog(tmp_path)
    log.open(0)
    marker = tmp_path / committed.NAME
    log.write(encode(_upsert("a", 1)), sync=True)
    acknowledged = committed.read(marker)[0]
    assert acknowledged == committed.Committed(0, _segment(tmp_path).stat().st_size)
    log.write(encode(_upsert("b", 2)), sync=False)
    assert committed.read(marker)[0] == acknowledged
    log.sync()
    assert committed.read(marker)[0] == committed.Committed(0, _segment(tmp_path).stat().st_size)
    log.close()


def _write_format_1(directory: Path, segment: int, ops: list[Op]) -> Path:
    """A segment as shards wrote them before the segment header: `<u32 length><u32 crc32(body)><body>`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = _segment(directory, segment)
    path.write_bytes(b"".join(frame_v1(body(op)) for op in ops))
    return path


def test_segments_of_the_first_format_are_read_and_a_new_segment_follows_them(tmp_path: Path) -> None:
    """An upgrade loses nothing: format-1 segments replay, a torn format-1 tail is cut as before, and new
    writes go to a new format-2 segment (never appended to a format-1 one)."""
    old_first, old_last = _ops(5), _ops(4, first=5)
    _write_format_1(tmp_path, 3, old_first)
    last_path = _write_format_1(tmp_path, 4, old_last)
    whole = last_path.stat().st_size
    with last_path.open("ab") as file:
        file.write(frame_v1(body(_upsert("torn", 9)))[:-3])

    log = AppendLog(tmp_path)
    _assert_same_ops(log.replay(3), old_first + old_last)
    assert last_path.stat().st_size == whole
    log.open(3)
    assert log.segment == 5
    new = [_upsert("new", 10)]
    log.write(encode(new[0]), sync=True)
    log.close()
    assert _segment(tmp_path, 5).read_bytes().startswith(MAGIC)
    _assert_same_ops(AppendLog(tmp_path).replay(3), old_first + old_last + new)


def test_a_bit_flip_in_a_first_format_record_is_damage(tmp_path: Path) -> None:
    ops = _ops(5)
    path = _write_format_1(tmp_path, 0, ops)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # the last record's vector
    path.write_bytes(bytes(data))
    refusal = _refusal(tmp_path)
    assert [problem.offset for problem in refusal.problems] == [len(data) - len(frame_v1(body(ops[-1])))]


def test_a_flipped_bit_in_the_segment_header_is_damage_not_a_torn_tail(tmp_path: Path) -> None:
    """The header of the only (so the last) segment: read as the first format, it must not look torn."""
    ops = _ops(3)
    for position in range(len(MAGIC)):
        for bit in range(8):
            directory = tmp_path / f"{position}-{bit}"
            path = _write_segment(directory, ops)
            (directory / committed.NAME).unlink()  # so only the frames themselves can tell
            data = bytearray(path.read_bytes())
            data[position] ^= 1 << bit
            path.write_bytes(bytes(data))
            assert [problem.offset for problem in _refusal(directory).problems] == [0], (position, bit)


def test_roll_seals_and_drop_before(tmp_path: Path) -> None:
    log = AppendLog(tmp_path)
    log.open(0)
    first, second, third = _upsert("a", 1), _upsert("b", 2), Op("space", "a")
    log.write(encode(first), sync=True)
    assert log.roll() == 1
    log.write(encode(second), sync=False)
    assert log.roll() == 2
    log.write(encode(third), sync=True)
    assert log.segments() == [0, 1, 2]
    assert _segment(tmp_path, 0).read_bytes().endswith(SEAL)
    assert _segment(tmp_path, 1).read_bytes() == MAGIC + encode(second) + SEAL
    assert [op.item_id for op in log.replay(0)] == ["a", "b", "a"]
    assert [op.item_id for op in log.replay(1)] == ["b", "a"]
    assert log.replay(2)[0].item is None

    log.drop_before(2)
    assert log.segments() == [2]
    log.write(encode(_upsert("c", 3)), sync=True)
    log.close()

    reopened = AppendLog(tmp_path)
    assert [op.item_id for op in reopened.replay(2)] == ["a", "c"]
    reopened.open(0)  # appends to the newest segment, not a new one numbered 0
    assert reopened.segment == 2
    reopened.close()
    assert reopened.segments() == [2]


def test_a_sealed_last_segment_is_not_appended_to(tmp_path: Path) -> None:
    """A kill between sealing a segment and creating the next leaves a sealed last segment: the next
    writes go to a new one, never after the seal."""
    ops = _ops(3)
    path = _write_segment(tmp_path, ops)
    with path.open("ab") as file:
        file.write(SEAL)
    log = AppendLog(tmp_path)
    _assert_same_ops(log.replay(0), ops)
    log.open(0)
    assert log.segment == 1
    log.write(encode(_upsert("next", 4)), sync=True)
    log.close()
    assert [op.item_id for op in AppendLog(tmp_path).replay(0)][-1] == "next"


def test_open_starts_a_new_segment_at_start_when_none_exists(tmp_path: Path) -> None:
    log = AppendLog(tmp_path)
    log.open(5)
    log.write(encode(_upsert("a", 1)), sync=True)
    log.close()
    assert log.segments() == [5]
    assert [op.item_id for op in AppendLog(tmp_path).replay(5)] == ["a"]


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A write that fails (ENOSPC half-way, or EIO from fsync) is not acknowledged: none of it may be
    replayed, it must not strand the records appended after it behind a damaged frame, and the marker
    does not move."""
    log = AppendLog(tmp_path)
    log.open(0)
    log.write(encode(_upsert("before", 1)), sync=True)
    marked = committed.read(tmp_path / committed.NAME)[0]

    real_write, real_fsync = os.write, os.fsync

    def half_then_fail(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    if failing == "write":
        monkeypatch.setattr(wal.os, "write", half_then_fail)
    else:
        monkeypatch.setattr(wal.os, "fsync", fail)
    with pytest.raises(OSError):
        log.write(encode(_upsert("failed", 2)), sync=True)
    assert committed.read(tmp_path / committed.NAME)[0] == marked
    monkeypatch.setattr(wal.os, "write", real_write)
    monkeypatch.setattr(wal.os, "fsync", real_fsync)

    log.write(encode(_upsert("after", 3)), sync=True)
    log.close()
    assert [op.item_id for op in AppendLog(tmp_path).replay(0)] == ["before", "after"]
    assert log.healthy


@pytest.mark.parametrize("failing", ["seal", "next-segment"])
def test_a_failed_roll_leaves_the_segment_open_and_unsealed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A disk full while rolling: no seal stays behind (writes after it would be damage), no half-made
    next segment, and the log goes on in the same segment."""
    log = AppendLog(tmp_path)
    log.open(0)
    log.write(encode(_upsert("before", 1)), sync=True)
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        if failing == "seal" or bytes(data) == MAGIC:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(wal.os, "write", full)
    with pytest.raises(OSError):
        log.roll()
    monkeypatch.setattr(wal.os, "write", real_write)
    assert log.segments() == [0] and log.segment == 0 and log.healthy
    log.write(encode(_upsert("after", 2)), sync=True)
    log.close()
    assert not _segment(tmp_path).read_bytes().endswith(SEAL)
    assert [op.item_id for op in AppendLog(tmp_path).replay(0)] == ["before", "after"]
