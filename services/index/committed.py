"""`log/COMMITTED`: how much of the log was acknowledged, so that a log cut short is seen as damage.

After each group commit (with INDEX_FSYNC=interval: after each periodic fsync) the writer rewrites this
small checksummed file in place with the segment and the length that fsync made durable. It is not
fsync'd itself: it can only lag behind the durable log (a power cut may lose its last update), never run
ahead of it, so a log shorter than it says is always damage. It is advisory: a missing one checks nothing,
and a damaged one is reported and ignored.
"""

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

NAME = "COMMITTED"
_MAGIC = b"IXC1"
_BODY = struct.Struct("<4sQQ")
_CRC = struct.Struct("<I")
SIZE = _BODY.size + _CRC.size


@dataclass(frozen=True)
class Committed:
    segment: int
    length: int


def pack(mark: Committed) -> bytes:
    data = _BODY.pack(_MAGIC, mark.segment, mark.length)
    return data + _CRC.pack(zlib.crc32(data))


def read(path: Path) -> tuple[Committed | None, str]:
    """(the mark, "") or (None, what is wrong with the file); (None, "") when there is none."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, ""
    if len(data) != SIZE:
        return None, f"{len(data)} bytes, not {SIZE}"
    magic, segment, length = _BODY.unpack_from(data)
    (crc,) = _CRC.unpack_from(data, _BODY.size)
    if magic != _MAGIC or zlib.crc32(data[: _BODY.size]) != crc:
        return None, "checksum mismatch"
    return Committed(segment, length), ""


class Marker:
    """The open COMMITTED file of a log that is being written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self._fd, SIZE)  # a damaged one may be longer

    def update(self, mark: Committed) -> None:
        """Rewrite it in place (one small pwrite, no fsync: see the module's docstring)."""
        os.pwrite(self._fd, pack(mark), 0)

    def close(self) -> None:
        os.close(self._fd)
