"""The append-only log of one shard, in numbered segment files (`log/<segment>.log`), and how it is checked.

A snapshot taken when segment N is opened covers every record in the segments before N, so start-up
loads a snapshot and replays segments N, N+1, ... Rolling to a new segment first seals the old one (a
last frame, fsync'd), so a segment that is not the last and ends without its seal was cut short.

What start-up accepts (`inspect`): the segments from the snapshot's on, without gaps; every one intact,
the last one possibly ending in an incomplete record (a kill mid-write: it was never acknowledged, and is
cut off); none shorter than `log/COMMITTED` says was acknowledged. Anything else is a `Problem`.
"""

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from services.common.durable import fsync_dir
from services.index import committed
from services.index.damage import Damaged, Problem
from services.index.records import MAGIC, SEAL, Op, scan

log = logging.getLogger("index.wal")


def segment_path(directory: Path, segment: int) -> Path:
    return directory / f"{segment:012d}.log"


def segments(directory: Path) -> list[int]:
    return sorted(int(path.stem) for path in directory.glob("*.log") if path.stem.isdigit())


@dataclass
class LogReport:
    """What reading the log from one segment on found."""

    ops: list[Op] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    cut: tuple[Path, int] | None = None  # an incomplete last record: (segment file, where it starts)
    marker_problem: Problem | None = None  # a damaged COMMITTED file (advisory: ignored)
    segments: list[int] = field(default_factory=list)
    records: int = 0


def inspect(directory: Path, start: int) -> LogReport:
    """Read and check the segments from `start` on (`start` > 0: a snapshot's, whose segment must exist)."""
    report = LogReport()
    mark, wrong = committed.read(directory / committed.NAME)
    if wrong:
        report.marker_problem = Problem(directory / committed.NAME, None, f"damaged ({wrong}); ignored")
    numbers = [number for number in segments(directory) if number >= start]
    report.segments = numbers
    report.problems += gaps(directory, start, numbers)
    for position, number in enumerate(numbers):
        path = segment_path(directory, number)
        found = scan(path.read_bytes())
        last = position == len(numbers) - 1
        report.ops.extend(found.ops)
        report.records += found.records
        if found.damage:
            report.problems.append(Problem(path, found.end, found.damage))
        elif found.torn and last:
            report.cut = (path, found.end)
        elif found.torn:
            report.problems.append(
                Problem(path, found.end, "incomplete record in a segment that is not the last")
            )
        elif not last and found.version == 2 and not found.sealed:
            report.problems.append(Problem(path, found.end, "ends without its seal: it was cut short"))
        if mark is not None and mark.segment == number and found.end < mark.length and not found.damage:
            report.problems.append(
                Problem(
                    path,
                    found.end,
                    f"intact only up to here, but {mark.length} bytes were acknowledged: the log was cut short",
                )
            )
    if mark is not None and mark.segment >= start and (not numbers or mark.segment > numbers[-1]):
        report.problems.append(
            Problem(
                segment_path(directory, mark.segment),
                None,
                f"missing, but {mark.length} bytes of it were acknowledged: the log was cut short",
            )
        )
    return report


def gaps(directory: Path, start: int, numbers: list[int]) -> list[Problem]:
    """Missing segments: each run of them, from `start` (which must exist when > 0: a snapshot's) on."""
    wanted = set(range(start, numbers[-1] + 1)) if numbers else {start} if start > 0 else set()
    missing = sorted(wanted - set(numbers))
    runs: list[list[int]] = []
    for number in missing:
        if runs and runs[-1][-1] == number - 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return [
        Problem(
            segment_path(directory, run[0]),
            None,
            f"missing{f' (and the {len(run) - 1} segments after it)' if len(run) > 1 else ''}: the log must "
            f"run without gaps from segment {start}",
        )
        for run in runs
    ]


def cut(path: Path, offset: int) -> None:
    with path.open("r+b") as file:
        file.truncate(offset)
        os.fsync(file.fileno())


class AppendLog:
    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._marker: committed.Marker | None = None
        self._lock = threading.Lock()  # the writer's appends, the periodic fsync, rolls and close
        self.segment = 0
        self.healthy = True  # False once a failed write could not be cut back off the log

    def _path(self, segment: int) -> Path:
        return segment_path(self._dir, segment)

    def segments(self) -> list[int]:
        return segments(self._dir)

    def replay(self, start: int) -> list[Op]:
        """Every op of segments >= `start`, in order, once the log passed `inspect` (else `Damaged`); an
        incomplete last record is cut off."""
        report = inspect(self._dir, start)
        if report.problems:
            raise Damaged(self._dir.parent, report.problems)
        if report.marker_problem is not None:
            log.error("index log marker %s", report.marker_problem)
        if report.cut is not None:
            path, offset = report.cut
            log.warning(
                "index log %s: cutting an incomplete last record of %d bytes at byte %d (a write "
                "interrupted before it was acknowledged)",
                path,
                path.stat().st_size - offset,
                offset,
            )
            cut(path, offset)
        return report.ops

    def open(self, start: int) -> None:
        """Append to the newest segment (or a new one numbered `start` when there is none at or after it;
        or the next one when the newest is sealed or of format 1)."""
        with self._lock:
            existing = [segment for segment in self.segments() if segment >= start]
            segment = existing[-1] if existing else start
            if existing and not self._appendable(self._path(segment)):
                segment += 1
            self._fd = self._create(segment)
            self.segment = segment
            self._marker = committed.Marker(self._dir / committed.NAME)
            self._mark(os.lseek(self._fd, 0, os.SEEK_END))

    def _appendable(self, path: Path) -> bool:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(len(MAGIC))
            if size < len(MAGIC):
                return MAGIC.startswith(head)
            file.seek(max(0, size - len(SEAL)))
            return head == MAGIC and file.read() != SEAL

    def _create(self, segment: int) -> int:
        """Open `segment` for appending, giving it its header first (a new or empty file, or one that holds
        a torn header only); fsync'd, so what the marker says next is durable."""
        fd = os.open(self._path(segment), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < len(MAGIC):
                os.ftruncate(fd, 0)
                _write_all(fd, MAGIC)
            os.fsync(fd)
            fsync_dir(self._dir)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _mark(self, length: int) -> None:
        """Record `length` bytes of the open segment as acknowledged (advisory: a failure is only logged)."""
        assert self._marker is not None
        try:
            self._marker.update(committed.Committed(self.segment, length))
        except OSError:
            log.exception("index log marker %s could not be updated; it lags behind", self._marker.path)

    def write(self, frames: bytes, sync: bool) -> None:
        """Append `frames` (whole records); with `sync`, return only once they are on disk."""
        with self._lock:
            assert self._fd is not None, "open() the log first"
            end = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                _write_all(self._fd, frames)
                if sync:
                    os.fsync(self._fd)
            except OSError:
                # Not acknowledged: cut whatever of it reached the file, or the records appended after it
                # (acknowledged ones) would sit behind a damaged frame.
                self._cut_back(end)
                raise
            if sync:
                self._mark(end + len(frames))

    def _cut_back(self, end: int) -> None:
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, end)
        except OSError:
            self.healthy = False

    def sync(self) -> None:
        """fsync what was appended (INDEX_FSYNC=interval), then record it as acknowledged."""
        with self._lock:
            if self._fd is None:
                return
            length = os.lseek(self._fd, 0, os.SEEK_END)
            os.fsync(self._fd)
            self._mark(length)

    def roll(self) -> int:
        """Seal the open segment and start the next; returns its number (a snapshot taken now covers
        everything before it). On failure the open segment stays open, unsealed."""
        with self._lock:
            assert self._fd is not None, "open() the log first"
            end = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                _write_all(self._fd, SEAL)
                os.fsync(self._fd)
                fd = self._create(self.segment + 1)
            except OSError:
                self._path(self.segment + 1).unlink(missing_ok=True)
                self._cut_back(end)
                raise
            os.close(self._fd)
            self._fd = fd
            self.segment += 1
            self._mark(len(MAGIC))
            return self.segment

    def bytes_from(self, segment: int) -> int:
        """The size of the segments from `segment` on."""
        return sum(self._path(number).stat().st_size for number in self.segments() if number >= segment)

    def drop_before(self, segment: int) -> None:
        """Delete the segments that no kept snapshot needs."""
        for old in self.segments():
            if old < segment:
                self._path(old).unlink()
        fsync_dir(self._dir)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
                self._mark(os.lseek(self._fd, 0, os.SEEK_END))
                os.close(self._fd)
                self._fd = None
            if self._marker is not None:
                self._marker.close()
                self._marker = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
