"""The index shard's append-only log: record framing, torn-tail recovery, segments."""

import errno
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from services.index import wal
from services.index.records import Item, Op, decode_all, encode
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


def _ops(count: int) -> list[Op]:
    """Upserts with a delete every fourth op, so both record types sit in the log."""
    return [
        Op("space", f"id-{n - 1}") if n % 4 == 3 else _upsert(f"id-{n}", seed=n, space="space")
        for n in range(count)
    ]


def _write_segment(directory: Path, ops: list[Op], segment: int = 0) -> Path:
    log = AppendLog(directory)
    log.open(segment)
    log.write(b"".join(map(encode, ops)), sync=True)
    log.close()
    return directory / f"{segment:012d}.log"


def test_records_round_trip() -> None:
    ops = [
        _upsert("plain", 1),
        Op("space", "plain"),
        _upsert("日本語-ü-🙂", 2, space="espace-é", payload='{"titre": "été ☀"}'),
        Op("espace-é", "日本語-ü-🙂"),
        _upsert("no-payload", 3, payload=""),
        Op("space", "x", Item("x", _unit(4, dim=1))),  # 1-d, every default
    ]
    data = b"".join(map(encode, ops))
    decoded, covered = decode_all(data)
    assert covered == len(data)
    assert len(decoded) == len(ops)
    for got, want in zip(decoded, ops, strict=True):
        _assert_same_op(got, want)
    assert decoded[4].item is not None and decoded[4].item.payload_json == ""
    assert decoded[5].item is not None and decoded[5].item.kind == 0
    assert decoded[5].item.model_id == "" and decoded[5].item.model_version == ""


def test_decode_stops_at_a_frame_with_a_valid_crc_but_an_unknown_record_type() -> None:
    good = encode(_upsert("a", 1))
    body = bytes([9]) + b"\x00" * 8
    bogus = len(body).to_bytes(4, "little") + zlib.crc32(body).to_bytes(4, "little") + body
    decoded, covered = decode_all(good + bogus + good)
    assert [op.item_id for op in decoded] == ["a"]
    assert covered == len(good)


@pytest.mark.parametrize("cut", [1, 4, 7, 8, 9, 20, -1])
def test_a_truncated_last_frame_is_cut_off_and_appending_works_after(tmp_path: Path, cut: int) -> None:
    ops = _ops(10)
    path = _write_segment(tmp_path, ops)
    last = len(encode(ops[-1]))
    intact = path.stat().st_size - last
    keep = last + cut if cut < 0 else cut  # bytes of the last frame that made it to disk
    with path.open("r+b") as file:
        file.truncate(intact + keep)

    log = AppendLog(tmp_path)
    replayed = log.replay(0)
    assert len(replayed) == len(ops) - 1
    for got, want in zip(replayed, ops[:-1], strict=True):
        _assert_same_op(got, want)
    assert path.stat().st_size == intact

    log.open(0)
    assert log.segment == 0
    appended = _upsert("after-the-tear", 99)
    log.write(encode(appended), sync=True)
    log.close()
    again = AppendLog(tmp_path).replay(0)
    assert len(again) == len(ops)
    _assert_same_op(again[-1], appended)
    for got, want in zip(again[:-1], ops[:-1], strict=True):
        _assert_same_op(got, want)


@pytest.mark.parametrize("where", ["length", "crc", "body-start", "body-middle", "body-end"])
def test_a_flipped_byte_in_the_last_frame_cuts_it_off(tmp_path: Path, where: str) -> None:
    ops = _ops(6)
    path = _write_segment(tmp_path, ops)
    data = bytearray(path.read_bytes())
    last = len(encode(ops[-1]))
    start = len(data) - last
    offset = {"length": 0, "crc": 5, "body-start": 8, "body-middle": last // 2, "body-end": last - 1}[where]
    data[start + offset] ^= 0x40
    path.write_bytes(bytes(data))

    replayed = AppendLog(tmp_path).replay(0)
    assert [op.item_id for op in replayed] == [op.item_id for op in ops[:-1]]
    assert path.stat().st_size == start


def test_a_zero_filled_tail_is_cut_off(tmp_path: Path) -> None:
    """A crash can leave the file extended with zeros past the last write: a zero frame decodes to nothing."""
    ops = _ops(5)
    path = _write_segment(tmp_path, ops)
    size = path.stat().st_size
    with path.open("ab") as file:
        file.write(b"\x00" * 64)
    replayed = AppendLog(tmp_path).replay(0)
    assert len(replayed) == len(ops)
    assert path.stat().st_size == size


def test_an_intact_log_replays_everything_and_is_left_alone(tmp_path: Path) -> None:
    ops = _ops(12)
    path = _write_segment(tmp_path, ops)
    before = path.read_bytes()
    replayed = AppendLog(tmp_path).replay(0)
    assert len(replayed) == len(ops)
    for got, want in zip(replayed, ops, strict=True):
        _assert_same_op(got, want)
    assert path.read_bytes() == before


def test_corruption_in_a_segment_that_is_not_the_last_raises(tmp_path: Path) -> None:
    first = _write_segment(tmp_path, _ops(6), segment=0)
    _write_segment(tmp_path, _ops(3), segment=1)
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))

    with pytest.raises(RuntimeError, match="corrupt"):
        AppendLog(tmp_path).replay(0)
    assert first.read_bytes() == bytes(data)  # nothing is cut off a middle segment
    assert len(AppendLog(tmp_path).replay(1)) == 3  # the segments after it are readable on their own


def test_roll_and_drop_before(tmp_path: Path) -> None:
    log = AppendLog(tmp_path)
    log.open(0)
    first, second, third = _upsert("a", 1), _upsert("b", 2), Op("space", "a")
    log.write(encode(first), sync=True)
    assert log.roll() == 1
    log.write(encode(second), sync=False)
    assert log.roll() == 2
    log.write(encode(third), sync=True)
    assert log.segments() == [0, 1, 2]
    assert [op.item_id for op in log.replay(0)] == ["a", "b", "a"]
    assert [op.item_id for op in log.replay(1)] == ["b", "a"]
    assert log.replay(2)[0].item is None

    log.drop_before(2)
    assert log.segments() == [2]
    log.write(encode(_upsert("c", 3)), sync=True)
    log.close()

    reopened = AppendLog(tmp_path)
    assert [op.item_id for op in reopened.replay(0)] == ["a", "c"]
    reopened.open(0)  # appends to the newest segment, not a new one numbered 0
    assert reopened.segment == 2
    reopened.close()
    assert reopened.segments() == [2]


def test_open_starts_a_new_segment_at_start_when_none_exists(tmp_path: Path) -> None:
    log = AppendLog(tmp_path)
    log.open(5)
    log.write(encode(_upsert("a", 1)), sync=True)
    log.close()
    assert log.segments() == [5]
    assert AppendLog(tmp_path).replay(6) == []


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A write that fails (ENOSPC half-way, or EIO from fsync) is not acknowledged: none of it may be
    replayed, and it must not strand the records appended after it behind a torn frame."""
    log = AppendLog(tmp_path)
    log.open(0)
    log.write(encode(_upsert("before", 1)), sync=True)

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
    monkeypatch.setattr(wal.os, "write", real_write)
    monkeypatch.setattr(wal.os, "fsync", real_fsync)

    log.write(encode(_upsert("after", 3)), sync=True)
    log.close()
    assert [op.item_id for op in AppendLog(tmp_path).replay(0)] == ["before", "after"]
