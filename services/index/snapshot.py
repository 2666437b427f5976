"""Snapshots of a shard: every space's rows and engine, written to a temporary directory and renamed
into `snapshots/<segment>` only once complete, so a kill mid-write leaves the previous one in force."""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from services.common.durable import fsync_dir

_ARRAYS = ("vectors", "kinds", "alive", "models")


def _save_array(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as file:
        np.save(file, array)
        file.flush()
        os.fsync(file.fileno())


def _save_json(path: Path, value: object) -> None:
    with path.open("wb") as file:
        file.write(json.dumps(value).encode())
        file.flush()
        os.fsync(file.fileno())


def write(directory: Path, segment: int, states: dict[str, dict[str, Any]]) -> Path:
    """Write a snapshot covering the log segments before `segment`; returns its directory."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{segment:012d}"
    temporary = directory / f".tmp-{segment:012d}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    manifest = []
    for number, (name, state) in enumerate(sorted(states.items())):
        folder = temporary / str(number)
        folder.mkdir()
        for key in _ARRAYS:
            _save_array(folder / f"{key}.npy", state[key])
        if state["engine_state"] is not None:
            _save_array(folder / "engine.npy", state["engine_state"])
        _save_json(
            folder / "meta.json", {key: state[key] for key in ("ids", "payloads", "model_refs", "engine")}
        )
        fsync_dir(folder)
        manifest.append({"space": name, "folder": str(number)})
    _save_json(temporary / "manifest.json", manifest)
    fsync_dir(temporary)
    os.replace(temporary, final)
    fsync_dir(directory)
    return final


def latest(directory: Path) -> tuple[int, dict[str, dict[str, Any]]] | None:
    """The newest complete snapshot: (the first log segment it does not cover, each space's state)."""
    if not directory.is_dir():
        return None
    complete = sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())
    if not complete:
        return None
    segment = complete[-1]
    folder = directory / f"{segment:012d}"
    states: dict[str, dict[str, Any]] = {}
    for entry in json.loads((folder / "manifest.json").read_text()):
        space_dir = folder / entry["folder"]
        state: dict[str, Any] = {key: np.load(space_dir / f"{key}.npy") for key in _ARRAYS}
        state.update(json.loads((space_dir / "meta.json").read_text()))
        engine_file = space_dir / "engine.npy"
        state["engine_state"] = np.load(engine_file) if engine_file.exists() else None
        states[entry["space"]] = state
    return segment, states


def drop_before(directory: Path, segment: int) -> None:
    """Remove snapshots older than `segment`, and any left half-written by a kill."""
    for path in directory.iterdir():
        if (path.name.isdigit() and int(path.name) < segment) or path.name.startswith(".tmp-"):
            if path.name != f".tmp-{segment:012d}":
                shutil.rmtree(path, ignore_errors=True)
    fsync_dir(directory)
