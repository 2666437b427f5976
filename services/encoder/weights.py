"""Model versions derived from the weights' content, so a version changes exactly when the weights do."""

import hashlib
from pathlib import Path


def content_version(path: Path, length: int = 12) -> str:
    """Short sha256 of a file, or of every file under a directory (relative names included)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:length]
