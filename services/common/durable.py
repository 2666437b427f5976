"""Files that survive a crash: written and fsync'd before they are renamed into place, and the directory
entries that name them fsync'd too."""

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a file created, renamed or removed in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> str:
    """Write `data` to `path` and fsync it; returns its sha256 (hex), for a checksum kept beside it."""
    return write_parts_synced(path, [data])


def write_parts_synced(path: Path, parts: Sequence[bytes | memoryview]) -> str:
    """`write_synced` of the parts one after another, never joined: a large array is written (and
    hashed) from its own memory, not from a copy."""
    digest = hashlib.sha256()
    with path.open("wb") as file:
        for part in parts:
            file.write(part)
            digest.update(part)
        file.flush()
        os.fsync(file.fileno())
    return digest.hexdigest()
