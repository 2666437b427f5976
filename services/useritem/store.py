"""Trained models on disk: `<data_dir>/<model>/<version>/` holds one version that has served, and
`<model>/CURRENT` names the serving one.

A new version is written in two steps, so that only a Fit that completes changes what serves:

1. `stage` (on the fit thread, once training is done): the files go into `.tmp-<version>/`, are fsync'd
   with checksums and renamed to `.staged-<version>/`. Nothing serves from a hidden folder.
2. `promote` (once the Fit is sure to complete): CURRENT.tmp is written, fsync'd and renamed over
   CURRENT (the commit point: a kill before it leaves the previous version serving, after it the new
   one), then `.staged-<version>/` is renamed to `<version>/` and older versions beyond
   USERITEM_KEEP_VERSIONS are pruned.

A Fit that fails or is cancelled before promotion discards its staged folder (`discard`); a kill leaves
one behind, which the next start or promotion deletes. A start that finds CURRENT naming a version
still in its staged folder (a kill between the commit and the rename) finishes the rename. So every
`<version>/` folder is one that was promoted: when CURRENT's version is damaged (checksums are verified
on load) the newest intact one of those serves instead, logged, and never a version that no Fit
completed.
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

from services.common.durable import fsync_dir, write_parts_synced, write_synced
from services.useritem.content_map import ContentMap
from services.useritem.model import MF, Metrics, TrainedModel

log = logging.getLogger("useritem.store")

_ARRAYS = ("user_vectors", "item_vectors", "user_bias", "item_bias", "seen_offsets", "seen_items")
_EASE_ARRAYS = ("item_weights", "seen_weights")  # written only by the kinds that have them
_CURRENT = "CURRENT"
_TEMPORARY = ".tmp-"  # a version being written
_STAGED = ".staged-"  # a version written in full, not promoted


def _npy(array: np.ndarray) -> list[bytes | memoryview]:
    """The .npy file of `array` (what np.save writes) as its header and the array's own memory: an EASE
    matrix is hundreds of megabytes, and np.save into a buffer would hold two more copies of it."""
    contiguous = np.require(array, requirements="C")  # (ascontiguousarray would make a 0-d array 1-d)
    header = BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(contiguous))
    if not contiguous.nbytes:
        return [header.getvalue()]
    return [header.getvalue(), contiguous.reshape(-1).data.cast("B")]


class ModelStore:
    def __init__(self, data_dir: str, keep_versions: int) -> None:
        self._root = Path(data_dir)
        self._keep = max(1, keep_versions)

    def save(self, model: TrainedModel) -> Path:
        """Stage and promote `model` at once (a version that needs no Fit to complete first)."""
        self.stage(model)
        return self.promote(model)

    def stage(self, model: TrainedModel) -> None:
        """Write `model`'s files, not yet serving (an intact promoted folder of the same version is
        reused). Leftovers of Fits that never completed are deleted first. On failure nothing stays."""
        folder = self._root / model.name
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            if path.is_dir() and path.name.startswith((_TEMPORARY, _STAGED)):
                shutil.rmtree(path, ignore_errors=True)
        if _intact(folder / model.version):
            return
        temporary = folder / f"{_TEMPORARY}{model.version}"
        try:
            temporary.mkdir()
            _write(temporary, model)
            fsync_dir(temporary)
            os.replace(temporary, folder / f"{_STAGED}{model.version}")
            fsync_dir(folder)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            self.discard(model)
            raise

    def promote(self, model: TrainedModel) -> Path:
        """Make the staged `model` the serving version on disk. An OSError before CURRENT is replaced
        leaves everything as it was; once it is replaced the promotion is done, and what follows (the
        folder's rename, pruning) is completed at the next start if it fails now, so it is logged, not
        raised."""
        folder = self._root / model.name
        final = folder / model.version
        pointer = folder / f"{_CURRENT}.tmp"
        try:
            write_synced(pointer, model.version.encode())
            os.replace(pointer, folder / _CURRENT)
        except BaseException:
            pointer.unlink(missing_ok=True)
            self.discard(model)
            raise
        try:
            fsync_dir(folder)
            staged = folder / f"{_STAGED}{model.version}"
            if staged.is_dir():
                if final.is_dir():  # a damaged copy of the same version, which the staged one replaces
                    shutil.rmtree(final)
                os.replace(staged, final)
                fsync_dir(folder)
            self._prune(folder, model.version)
        except OSError as error:
            log.error(
                "model %s: version %s promoted, tidying up failed (%s)", model.name, model.version, error
            )
        return final

    def discard(self, model: TrainedModel) -> None:
        """Delete what `stage` wrote for `model`, unless CURRENT names it (then it is being promoted)."""
        folder = self._root / model.name
        if _current(folder) == model.version:
            return
        for prefix in (_TEMPORARY, _STAGED):
            shutil.rmtree(folder / f"{prefix}{model.version}", ignore_errors=True)

    def _prune(self, folder: Path, current: str) -> None:
        """Keep the serving version and the newest others, up to USERITEM_KEEP_VERSIONS; delete the rest
        and every leftover of a Fit that did not complete."""
        versions = sorted(self._versions(folder), key=lambda path: path.stat().st_mtime, reverse=True)
        others = [path.name for path in versions if path.name != current]
        keep = {current, *others[: self._keep - 1]}
        for path in folder.iterdir():
            if path.is_dir() and (path.name.startswith(".") or path.name not in keep):
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _versions(folder: Path) -> list[Path]:
        return [path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")]

    def load_all(self) -> dict[str, TrainedModel]:
        """Every model's CURRENT version (or, if that is damaged, its newest intact one). Finishes a
        promotion a kill interrupted and deletes what Fits that never completed left behind."""
        models: dict[str, TrainedModel] = {}
        if not self._root.is_dir():
            return models
        for folder in sorted(path for path in self._root.iterdir() if path.is_dir()):
            current = _current(folder)
            self._recover(folder, current)
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

    @staticmethod
    def _recover(folder: Path, current: str) -> None:
        """Rename CURRENT's version out of its staged folder (a kill after the commit of its promotion);
        delete every other temporary or staged folder (Fits that never completed)."""
        (folder / f"{_CURRENT}.tmp").unlink(missing_ok=True)
        for path in folder.iterdir():
            if not path.is_dir() or not path.name.startswith((_TEMPORARY, _STAGED)):
                continue
            final = folder / current
            if current and path.name == f"{_STAGED}{current}" and not final.exists():
                os.replace(path, final)
                fsync_dir(folder)
                log.warning("model %s: finished promoting version %s", folder.name, current)
            else:
                shutil.rmtree(path, ignore_errors=True)
                log.info("model %s: deleted %s, left by a Fit that did not complete", folder.name, path.name)


def _current(folder: Path) -> str:
    pointer = folder / _CURRENT
    try:
        return pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _intact(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    try:
        load(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def _write(folder: Path, model: TrainedModel) -> None:
    present = [name for name in (*_ARRAYS, *_EASE_ARRAYS) if getattr(model, name) is not None]
    sums = {
        f"{name}.npy": write_parts_synced(folder / f"{name}.npy", _npy(getattr(model, name)))
        for name in present
    }
    content = model.content_map
    if content is not None:
        sums["content_weights.npy"] = write_parts_synced(
            folder / "content_weights.npy", _npy(content.weights)
        )
    sums["ids.json"] = write_synced(
        folder / "ids.json", json.dumps({"users": model.users, "items": model.items}).encode()
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
        "kind": model.kind,
        "metrics": dataclasses.asdict(model.metrics),
        "sha256": sums,
    }
    if content is not None:
        meta["content_map"] = {
            "space": content.space,
            "l2": content.l2,
            "items": content.items,
            "r2": content.r2,
        }
    write_synced(folder / "meta.json", json.dumps(meta, indent=1).encode())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load(folder: Path) -> TrainedModel:
    """One saved version; ValueError when a file's checksum does not match."""
    meta = json.loads((folder / "meta.json").read_text())
    sums = meta["sha256"]
    names = [*_ARRAYS, *(name for name in _EASE_ARRAYS if f"{name}.npy" in sums)]
    has_map = "content_map" in meta
    # Checksums read the files in chunks, and each array is read once, into itself: an EASE matrix is
    # hundreds of megabytes, which whole-file bytes and a parsed copy would double.
    for file in [f"{name}.npy" for name in names] + ["content_weights.npy"] * has_map + ["ids.json"]:
        if _sha256(folder / file) != sums[file]:
            raise ValueError(f"{file} does not match its checksum")
    arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in names}
    ids = json.loads((folder / "ids.json").read_bytes())
    content_map = None
    if has_map:
        described = meta["content_map"]
        content_map = ContentMap(
            space=described["space"],
            weights=np.load(folder / "content_weights.npy", allow_pickle=False),
            l2=described["l2"],
            items=described["items"],
            r2=described["r2"],
        )
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
        kind=meta.get("kind", MF),
        content_map=content_map,
        **arrays,
    )
    if model.version != meta["version"]:
        raise ValueError(f"content hash {model.version} is not the saved version {meta['version']}")
    return model
