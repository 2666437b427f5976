"""Snapshots of a shard: every space's rows and engine at one moment, checksummed.

`snapshots/<segment>/` covers the log segments before `segment`. It holds two files whatever the number
of spaces: `data`, every space's arrays one after another, and `MANIFEST`, a JSON document (preceded by
its own sha256) giving each array's offset, length, dtype, shape and sha256. A snapshot is written to
`snapshots/.tmp-<segment>/` and renamed into place once both files are fsync'd, so a kill mid-write leaves
the previous ones in force; it is read back (past the page cache) before anything older is deleted.

Loading checks every checksum before anything is used (a damaged FAISS index must never reach FAISS) and
names the file, byte range and array of any damage. Snapshots written before this format (a folder per
space of .npy files and meta.json, no checksums) are still read, checked for structure and unit-norm
vectors only.
"""

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.durable import fsync_dir, write_synced
from services.index.damage import Problem

DATA, MANIFEST = "data", "MANIFEST"
_FORMAT = 2
_ARRAYS = ("vectors", "kinds", "alive", "models")
_META = ("ids", "payloads", "model_refs", "epoch")  # epoch: absent before generations existed (0)
_CHUNK = 1 << 23
# Arrays a snapshot may hold (and their dtypes): nothing else is ever built from a manifest.
_DTYPES = {
    "vectors": "<f4",
    "kinds": "|u1",
    "alive": "|b1",
    "models": "<i4",
    "engine_state": "|u1",
    "meta": "|u1",
}


class Abandoned(Exception):
    """The snapshot ran past its deadline and was given up (the log still holds everything)."""


@dataclass
class Deadline:
    """When a snapshot in progress must give up (time.monotonic()); None: never. Close shortens it."""

    at: float | None = None

    def check(self) -> None:
        if self.at is not None and time.monotonic() > self.at:
            raise Abandoned("the snapshot ran past its deadline")


class SnapshotDamaged(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(map(str, problems)))


def folder_of(directory: Path, segment: int) -> Path:
    return directory / f"{segment:012d}"


def complete(directory: Path) -> list[int]:
    """The segments of the snapshots in place (not half-written, not set aside), oldest first."""
    if not directory.is_dir():
        return []
    return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit() and path.is_dir())


def _regions(state: dict[str, Any]) -> dict[str, np.ndarray]:
    meta = {key: state[key] for key in _META if key in state}
    regions = {key: np.ascontiguousarray(state[key], dtype=_DTYPES[key]) for key in _ARRAYS}
    if state["engine_state"] is not None:
        regions["engine_state"] = np.ascontiguousarray(state["engine_state"], dtype=np.uint8)
    regions["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return regions


def write(directory: Path, segment: int, states: dict[str, dict[str, Any]], deadline: Deadline) -> Path:
    """Write a snapshot covering the log segments before `segment`; returns its folder. Raises Abandoned
    (leaving nothing in place) once `deadline` passes."""
    directory.mkdir(parents=True, exist_ok=True)
    final = folder_of(directory, segment)
    temporary = directory / f".tmp-{segment:012d}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        spaces = []
        offset = 0
        with (temporary / DATA).open("wb") as data:
            for name, state in sorted(states.items()):
                described = {}
                for key, array in _regions(state).items():
                    flat = array.reshape(-1).view(np.uint8).data
                    digest = hashlib.sha256()
                    for start in range(0, len(flat), _CHUNK):
                        deadline.check()
                        data.write(flat[start : start + _CHUNK])
                        digest.update(flat[start : start + _CHUNK])
                    described[key] = {
                        "offset": offset,
                        "length": len(flat),
                        "dtype": array.dtype.str,
                        "shape": list(array.shape),
                        "sha256": digest.hexdigest(),
                    }
                    offset += len(flat)
                spaces.append({"space": name, "engine": state["engine"], "regions": described})
            data.flush()
            deadline.check()
            os.fsync(data.fileno())
        manifest = json.dumps({"format": _FORMAT, "segment": segment, "data_bytes": offset, "spaces": spaces})
        text = manifest.encode()
        write_synced(temporary / MANIFEST, hashlib.sha256(text).hexdigest().encode() + b"\n" + text)
        fsync_dir(temporary)
        deadline.check()
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    os.replace(temporary, final)
    fsync_dir(directory)
    return final


def read_back(folder: Path, deadline: Deadline) -> list[Problem]:
    """Check a snapshot just written against its checksums, reading it from the disk rather than the page
    cache where the system allows (the writes were fsync'd, so their pages can be dropped)."""
    data = folder / DATA
    fd = os.open(data, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return check(folder, deadline)


def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise SnapshotDamaged([Problem(path, None, f"unreadable ({error.strerror or error})")]) from error
    digest, _, text = raw.partition(b"\n")
    if hashlib.sha256(text).hexdigest().encode() != digest:
        raise SnapshotDamaged([Problem(path, None, "checksum mismatch")])
    manifest: dict[str, Any] = json.loads(text)
    return manifest


def _chunks(data: Any, region: dict[str, Any], deadline: Deadline | None) -> Any:
    data.seek(region["offset"])
    left = int(region["length"])
    while left:
        if deadline is not None:
            deadline.check()
        chunk = data.read(min(left, _CHUNK))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


def _is_format_1(folder: Path) -> bool:
    return (folder / "manifest.json").exists() and not (folder / MANIFEST).exists()


def _region_problem(data_path: Path, name: str, key: str, region: dict[str, Any]) -> Problem:
    start, end = region["offset"], region["offset"] + region["length"]
    return Problem(data_path, start, f"sha256 mismatch in bytes {start}-{end - 1} (space {name!r}, {key})")


def _size_problem(folder: Path, manifest: dict[str, Any]) -> list[Problem]:
    data_path = folder / DATA
    try:
        size = data_path.stat().st_size
    except OSError as error:
        return [Problem(data_path, None, f"unreadable ({error.strerror or error})")]
    if size != manifest["data_bytes"]:
        at = min(size, manifest["data_bytes"])
        return [Problem(data_path, at, f"{size} bytes, but the manifest says {manifest['data_bytes']}")]
    return []


def check(folder: Path, deadline: Deadline | None = None) -> list[Problem]:
    """Every problem of the snapshot in `folder` (none: it loads as it was written)."""
    if _is_format_1(folder):
        try:
            return _read_format_1(folder)[1]
        except SnapshotDamaged as damaged:
            return damaged.problems
    try:
        manifest = _manifest(folder)
    except SnapshotDamaged as damaged:
        return damaged.problems
    problems = _size_problem(folder, manifest)
    data_path = folder / DATA
    if problems:
        return problems
    with data_path.open("rb") as data:
        for space in manifest["spaces"]:
            for key, region in space["regions"].items():
                digest = hashlib.sha256()
                for chunk in _chunks(data, region, deadline):
                    digest.update(chunk)
                if digest.hexdigest() != region["sha256"]:
                    problems.append(_region_problem(data_path, space["space"], key, region))
    return problems


def read(folder: Path) -> dict[str, dict[str, Any]]:
    """Each space's state, every checksum verified; SnapshotDamaged naming every damaged file and range."""
    states, problems = read_intact(folder)
    if problems:
        raise SnapshotDamaged(problems)
    return states


def read_intact(folder: Path) -> tuple[dict[str, dict[str, Any]], list[Problem]]:
    """The states of the spaces that are intact, and the problems of the others (salvage keeps the
    former). A manifest that cannot be read raises SnapshotDamaged: nothing can be located without it."""
    if _is_format_1(folder):
        return _read_format_1(folder)
    manifest = _manifest(folder)
    problems = _size_problem(folder, manifest)
    data_path = folder / DATA
    states: dict[str, dict[str, Any]] = {}
    if problems and not data_path.exists():
        return states, problems
    size = data_path.stat().st_size
    with data_path.open("rb") as data:
        for space in manifest["spaces"]:
            arrays: dict[str, np.ndarray] = {}
            for key, region in space["regions"].items():
                dtype = np.dtype(_DTYPES[key])
                array = np.zeros(int(region["length"]) // dtype.itemsize, dtype=dtype)
                data.seek(region["offset"])
                data.readinto(array.view(np.uint8).data)
                if hashlib.sha256(array.view(np.uint8).data).hexdigest() != region["sha256"]:
                    if region["offset"] + region["length"] <= size:  # else the size problem says it
                        problems.append(_region_problem(data_path, space["space"], key, region))
                    break
                arrays[key] = array.reshape(region["shape"])
            else:
                state: dict[str, Any] = {key: arrays[key] for key in _ARRAYS}
                state.update(json.loads(arrays["meta"].tobytes()))
                state["engine"] = space["engine"]
                state["engine_state"] = arrays.get("engine_state")
                states[space["space"]] = state
    return states, problems


def _read_format_1(folder: Path) -> tuple[dict[str, dict[str, Any]], list[Problem]]:
    """A snapshot of the first format, its damage named by file (it has no checksums: malformed files,
    inconsistent lengths and vectors that are not unit-norm are what can be seen)."""
    path = folder / "manifest.json"
    try:
        entries = [(entry["space"], folder / entry["folder"]) for entry in json.loads(path.read_text())]
    except _FORMAT_1_ERRORS as error:
        raise SnapshotDamaged([Problem(path, None, f"unreadable ({error})")]) from error
    states: dict[str, dict[str, Any]] = {}
    problems: list[Problem] = []
    for name, space_dir in entries:
        state: dict[str, Any] = {}
        try:
            for key in _ARRAYS:
                path = space_dir / f"{key}.npy"
                state[key] = np.load(path, allow_pickle=False)
            path = space_dir / "meta.json"
            state.update(json.loads(path.read_text()))
            path = space_dir / "engine.npy"
            state["engine_state"] = np.load(path, allow_pickle=False) if path.exists() else None
            path = space_dir / "vectors.npy"
            _check_format_1(state)
        except _FORMAT_1_ERRORS as error:
            problems.append(Problem(path, None, f"space {name!r}: unreadable ({error})"))
            continue
        states[name] = state
    return states, problems


_FORMAT_1_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, SyntaxError)


def _check_format_1(state: dict[str, Any]) -> None:
    vectors, alive = state["vectors"], state["alive"]
    rows = vectors.shape[0]
    lengths = {len(state[key]) for key in ("kinds", "alive", "models", "ids", "payloads")}
    if vectors.ndim != 2 or lengths != {rows}:
        raise ValueError("the space's arrays and lists have different lengths")
    norms = np.linalg.norm(vectors[alive.astype(bool)].astype(np.float64), axis=1)
    if not np.all(np.abs(norms - 1.0) < 1e-3):
        raise ValueError("vectors that are not unit-norm")


def set_aside(folder: Path) -> Path:
    """Rename a damaged snapshot out of the way (never deleted: it is evidence); returns its new name."""
    target = folder.with_name(f"{folder.name}.damaged")
    number = 1
    while target.exists():
        number += 1
        target = folder.with_name(f"{folder.name}.damaged-{number}")
    os.replace(folder, target)
    fsync_dir(folder.parent)
    return target


def drop_before(directory: Path, segment: int) -> None:
    """Remove the snapshots older than `segment`, and any left half-written by a kill."""
    for path in directory.iterdir():
        if (path.name.isdigit() and int(path.name) < segment) or path.name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)
    fsync_dir(directory)
