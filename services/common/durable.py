"""Files that survive a crash: written and fsync'd before they are renamed into place, and the directory
entries that name them fsync'd too."""

import hashlib
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a file created, renamed or removed in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes | memoryview) -> str:
    """Write `data` to `path` and fsync it; returns its sha256 (hex), for a checksum kept beside it."""
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    return hashlib.sha256(data).hexdigest()
