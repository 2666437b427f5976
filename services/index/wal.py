"""The append-only log of one shard, in numbered segment files (`log/<segment>.log`).

A snapshot taken when segment N is opened covers every record in the segments before N, so start-up
loads the newest snapshot and replays segments N, N+1, ... A kill can tear only the record being
written at the end of the last segment: it is cut off on open (it was never acknowledged).
"""

import logging
import os
from pathlib import Path

from services.common.durable import fsync_dir
from services.index.records import Op, decode_all

log = logging.getLogger("index.wal")


class AppendLog:
    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self.segment = 0
        self.healthy = True  # False once a failed write could not be cut back off the log

    def _path(self, segment: int) -> Path:
        return self._dir / f"{segment:012d}.log"

    def segments(self) -> list[int]:
        return sorted(int(path.stem) for path in self._dir.glob("*.log"))

    def replay(self, start: int) -> list[Op]:
        """Every intact op of segments >= `start`, in order; a torn tail of the last segment is cut off."""
        ops: list[Op] = []
        segments = [segment for segment in self.segments() if segment >= start]
        for position, segment in enumerate(segments):
            path = self._path(segment)
            data = path.read_bytes()
            intact, covered = decode_all(data)
            if covered < len(data):
                if position != len(segments) - 1:
                    raise RuntimeError(
                        f"index log {path} is corrupt at byte {covered} of {len(data)}, and later segments "
                        "exist: restore the data directory from a backup"
                    )
                log.warning(
                    "index log %s: cutting a torn tail of %d bytes (an unacknowledged write)",
                    path,
                    len(data) - covered,
                )
                with path.open("r+b") as file:
                    file.truncate(covered)
                    os.fsync(file.fileno())
            ops.extend(intact)
        return ops

    def open(self, start: int) -> None:
        """Append to the newest segment (or a new one numbered `start` when there is none at or after it)."""
        existing = [segment for segment in self.segments() if segment >= start]
        self._switch(existing[-1] if existing else start)

    def _switch(self, segment: int) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
        self._fd = os.open(self._path(segment), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fsync_dir(self._dir)
        self.segment = segment

    def write(self, frames: bytes, sync: bool) -> None:
        """Append `frames` (whole records); with `sync`, return only once they are on disk."""
        assert self._fd is not None, "open() the log first"
        end = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(frames)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if sync:
                os.fsync(self._fd)
        except OSError:
            # Not acknowledged: cut whatever of it reached the file, or the records appended after it
            # (acknowledged ones) would sit behind a torn frame, where replay stops.
            try:
                os.ftruncate(self._fd, end)
            except OSError:
                self.healthy = False
            raise

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def roll(self) -> int:
        """Start a new segment; returns its number (a snapshot taken now covers everything before it)."""
        self._switch(self.segment + 1)
        return self.segment

    def drop_before(self, segment: int) -> None:
        """Delete the segments a durable snapshot covers."""
        for old in self.segments():
            if old < segment:
                self._path(old).unlink()
        fsync_dir(self._dir)

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
