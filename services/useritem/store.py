"""Trained models on disk: `<data_dir>/<model>/<version>/` holds one version, `<model>/CURRENT` names the
serving one.

A version is written into a temporary folder, fsync'd, checksummed and renamed into place; only then
is CURRENT replaced (write, fsync, rename), so a kill at any point leaves the previous version serving.
At start the CURRENT version is loaded and its checksums verified; a damaged one is skipped (logged) for
the newest intact version.
"""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from io import BytesIO
from pathlib import Path

import numpy as np

from services.common.durable import fsync_dir, write_synced
from services.useritem.model import Metrics, TrainedModel

log = logging.getLogger("useritem.store")

_ARRAYS = ("user_vectors", "item_vectors", "user_bias", "item_bias", "seen_offsets", "seen_items")
_CURRENT = "CURRENT"


def _npy(array: np.ndarray) -> bytes:
    buffer = BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ModelStore:
    def __init__(self, data_dir: str, keep_versions: int) -> None:
        self._root = Path(data_dir)
        self._keep = max(1, keep_versions)

    def save(self, model: TrainedModel) -> Path:
        """Write `model` as a new version and make it the model's CURRENT one."""
        folder = self._root / model.name
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / model.version
        if not final.is_dir():
            temporary = folder / f".tmp-{model.version}"
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
            sums = {
                f"{name}.npy": write_synced(temporary / f"{name}.npy", _npy(getattr(model, name)))
                for name in _ARRAYS
            }
            sums["ids.json"] = write_synced(
                temporary / "ids.json", json.dumps({"users": model.users, "items": model.items}).encode()
            )
            meta = {
                "name": model.name,
                "version": model.version,
                "implicit": model.implicit,
                "rating_min": model.rating_min,
                "rating_max": model.rating_max,
                "global_mean": model.global_mean,
                "created": model.created,
                "l2": model.l2,
                "rating_unit": model.rating_unit,
                "metrics": dataclasses.asdict(model.metrics),
                "sha256": sums,
            }
            write_synced(temporary / "meta.json", json.dumps(meta, indent=1).encode())
            fsync_dir(temporary)
            os.replace(temporary, final)
        pointer = folder / f"{_CURRENT}.tmp"
        write_synced(pointer, model.version.encode())
        os.replace(pointer, folder / _CURRENT)
        fsync_dir(folder)
        self._prune(folder, model.version)
        return final

    def _prune(self, folder: Path, current: str) -> None:
        versions = sorted(self._versions(folder), key=lambda path: path.stat().st_mtime, reverse=True)
        others = [path.name for path in versions if path.name != current]
        keep = {current, *others[: self._keep - 1]}
        for path in folder.iterdir():
            if path.is_dir() and (path.name.startswith(".tmp-") or path.name not in keep):
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _versions(folder: Path) -> list[Path]:
        return [path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")]

    def load_all(self) -> dict[str, TrainedModel]:
        """Every model's CURRENT version (or, if that is damaged, its newest intact one)."""
        models: dict[str, TrainedModel] = {}
        if not self._root.is_dir():
            return models
        for folder in sorted(path for path in self._root.iterdir() if path.is_dir()):
            pointer = folder / _CURRENT
            current = pointer.read_text().strip() if pointer.exists() else ""
            candidates = sorted(self._versions(folder), key=lambda path: path.stat().st_mtime, reverse=True)
            candidates.sort(key=lambda path: path.name != current)
            for version in candidates:
                try:
                    models[folder.name] = load(version)
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                    # TypeError, AttributeError: a meta.json that is JSON but not of the expected shape
                    log.error(
                        "model %s version %s is damaged (%s); trying an older one",
                        folder.name,
                        version.name,
                        error,
                    )
                    continue
                if version.name != current:
                    log.warning(
                        "model %s: serving version %s, not CURRENT %r", folder.name, version.name, current
                    )
                break
        return models


def load(folder: Path) -> TrainedModel:
    """One saved version; ValueError when a file's checksum does not match."""
    meta = json.loads((folder / "meta.json").read_text())
    blobs: dict[str, bytes] = {}
    for name, digest in meta["sha256"].items():
        blob = (folder / name).read_bytes()
        if hashlib.sha256(blob).hexdigest() != digest:
            raise ValueError(f"{name} does not match its checksum")
        blobs[name] = blob
    arrays = {name: np.load(BytesIO(blobs[f"{name}.npy"]), allow_pickle=False) for name in _ARRAYS}
    ids = json.loads(blobs["ids.json"])
    model = TrainedModel(
        name=meta["name"],
        implicit=meta["implicit"],
        rating_min=meta["rating_min"],
        rating_max=meta["rating_max"],
        global_mean=meta["global_mean"],
        users=ids["users"],
        items=ids["items"],
        metrics=Metrics(**meta["metrics"]),
        created=meta["created"],
        l2=meta["l2"],
        rating_unit=meta.get("rating_unit", 1.0),
        **arrays,
    )
    if model.version != meta["version"]:
        raise ValueError(f"content hash {model.version} is not the saved version {meta['version']}")
    return model
