"""Trained models on disk: a save loads back identical, CURRENT follows the newest save, old versions are
pruned, and a damaged or half-written version never replaces an intact one."""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from services.useritem.model import Metrics, TrainedModel
from services.useritem.store import ModelStore, load
from services.useritem.training import seen_lists

_ARRAYS = ("user_vectors", "item_vectors", "user_bias", "item_bias", "seen_offsets", "seen_items")


def _model(
    seed: int, name: str = "mf", users: int = 30, items: int = 20, implicit: bool = False
) -> TrainedModel:
    """A model of random parameters (training is not what this file tests); each seed, a new version."""
    rng = np.random.default_rng(seed)
    user_rows = np.repeat(np.arange(users), 4)
    item_rows = np.concatenate([rng.choice(items, 4, replace=False) for _ in range(users)])
    offsets, seen = seen_lists(user_rows, item_rows, users)
    return TrainedModel(
        name=name,
        implicit=implicit,
        rating_min=0.5,
        rating_max=5.0,
        global_mean=0.0 if implicit else 3.0 + rng.random(),
        users=[f"user-{seed}-{row}" for row in range(users)],
        items=[f"item {row} é" for row in range(items)],
        user_vectors=rng.standard_normal((users, 6)).astype(np.float32),
        item_vectors=rng.standard_normal((items, 6)).astype(np.float32),
        user_bias=rng.standard_normal(users).astype(np.float32),
        item_bias=rng.standard_normal(items).astype(np.float32),
        seen_offsets=offsets,
        seen_items=seen,
        metrics=Metrics(
            validation_rmse=0.8 + seed / 100,
            validation_recall_at_10=0.25,
            train_loss=0.5,
            epochs=seed + 3,
            train_seconds=1.5,
            interactions=users * 4,
        ),
        created=1_700_000_000.0 + seed,
    )


def _save(store: ModelStore, model: TrainedModel, when: float) -> Path:
    """Save, then date the version folder: pruning and fallback order versions by modification time,
    which a fast test could otherwise leave equal."""
    folder = store.save(model)
    os.utime(folder, (when, when))
    return folder


def _assert_same(loaded: TrainedModel, model: TrainedModel) -> None:
    for name in _ARRAYS:
        expected, actual = getattr(model, name), getattr(loaded, name)
        assert actual.dtype == expected.dtype, name
        np.testing.assert_array_equal(actual, expected, err_msg=name)
    assert loaded.users == model.users and loaded.items == model.items
    assert loaded.version == model.version
    assert loaded.metrics == model.metrics
    assert (loaded.name, loaded.implicit, loaded.rating_min, loaded.rating_max) == (
        model.name,
        model.implicit,
        model.rating_min,
        model.rating_max,
    )
    assert loaded.global_mean == model.global_mean and loaded.created == model.created


def _current(root: Path, name: str = "mf") -> str:
    return (root / name / "CURRENT").read_text()


def _versions(root: Path, name: str = "mf") -> set[str]:
    return {path.name for path in (root / name).iterdir() if path.is_dir()}


def test_a_saved_model_loads_back_identical(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path), keep_versions=3)
    explicit, implicit = _model(1), _model(2, name="bpr", implicit=True)
    folder = store.save(explicit)
    store.save(implicit)
    assert folder == tmp_path / "mf" / explicit.version
    assert _current(tmp_path) == explicit.version

    loaded = ModelStore(str(tmp_path), keep_versions=3).load_all()
    assert sorted(loaded) == ["bpr", "mf"]
    _assert_same(loaded["mf"], explicit)
    _assert_same(loaded["bpr"], implicit)
    # the loaded model answers like the saved one
    assert [row.tolist() for row in loaded["mf"].recommend(3, 5, False)] == [
        row.tolist() for row in explicit.recommend(3, 5, False)
    ]


def test_an_empty_or_missing_data_dir_loads_nothing(tmp_path: Path) -> None:
    assert ModelStore(str(tmp_path / "none"), keep_versions=3).load_all() == {}
    assert ModelStore(str(tmp_path), keep_versions=3).load_all() == {}


def test_current_follows_the_newest_save(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path), keep_versions=3)
    first, second = _model(1), _model(2)
    _save(store, first, 1000)
    _save(store, second, 2000)
    assert _current(tmp_path) == second.version
    assert _versions(tmp_path) == {first.version, second.version}
    _assert_same(store.load_all()["mf"], second)
    # saving an older version again makes it CURRENT again (its folder is reused, not rewritten)
    store.save(first)
    assert _current(tmp_path) == first.version
    assert store.load_all()["mf"].version == first.version


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_only_keep_versions_stay_on_disk(tmp_path: Path, keep: int) -> None:
    store = ModelStore(str(tmp_path), keep_versions=keep)
    models = [_model(seed) for seed in range(5)]
    for when, model in enumerate(models, start=1):
        _save(store, model, when * 1000)
        # the serving version plus the newest others, up to keep_versions in all
        expected = {m.version for m in models[max(0, when - keep) : when]}
        assert _versions(tmp_path) == expected, (keep, when)
        assert _current(tmp_path) == model.version
    other = _model(9, name="other")
    store.save(other)
    assert len(_versions(tmp_path)) == keep  # pruning one model leaves the others alone
    assert _versions(tmp_path, "other") == {other.version}


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        "flip item_vectors.npy",
        "flip ids.json",
        "truncate user_bias.npy",
        "delete seen_items.npy",
        "meta.json not json",
        "meta.json version",
        "meta.json global_mean",
        "meta.json metrics key",
    ],
)
def test_a_damaged_current_version_falls_back_to_the_newest_intact_one(tmp_path: Path, damage: str) -> None:
    store = ModelStore(str(tmp_path), keep_versions=3)
    oldest, middle, newest = _model(1), _model(2), _model(3)
    _save(store, oldest, 1000)
    _save(store, middle, 2000)
    folder = _save(store, newest, 3000)
    assert _current(tmp_path) == newest.version

    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    if damage == "flip item_vectors.npy":
        _flip(folder / "item_vectors.npy", -5)  # inside the data, past the header
    elif damage == "flip ids.json":
        _flip(folder / "ids.json", 12)
    elif damage == "truncate user_bias.npy":
        path = folder / "user_bias.npy"
        path.write_bytes(path.read_bytes()[:-8])
    elif damage == "delete seen_items.npy":
        (folder / "seen_items.npy").unlink()
    elif damage == "meta.json not json":
        meta_path.write_text(meta_path.read_text()[:-20])
    elif damage == "meta.json version":
        meta_path.write_text(json.dumps({**meta, "version": middle.version}))
    elif damage == "meta.json global_mean":
        meta_path.write_text(json.dumps({**meta, "global_mean": meta["global_mean"] + 0.5}))
    elif damage == "meta.json metrics key":  # a flipped letter in a key: still JSON, no longer Metrics
        meta["metrics"]["epocha"] = meta["metrics"].pop("epochs")
        meta_path.write_text(json.dumps(meta))

    with pytest.raises((OSError, ValueError, KeyError, TypeError)):
        load(folder)
    loaded = ModelStore(str(tmp_path), keep_versions=3).load_all()
    _assert_same(loaded["mf"], middle)  # the newest intact one, not the oldest
    assert _current(tmp_path) == newest.version  # loading repairs nothing behind the operator's back


def test_every_version_damaged_loads_no_model_and_leaves_the_others(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path), keep_versions=3)
    first, second, other = _model(1), _model(2), _model(3, name="other")
    for when, model in enumerate((first, second, other), start=1):
        _save(store, model, when * 1000)
    for version in (first.version, second.version):
        _flip(tmp_path / "mf" / version / "user_vectors.npy", -1)
    loaded = store.load_all()
    assert sorted(loaded) == ["other"]
    _assert_same(loaded["other"], other)


def test_a_save_killed_half_way_leaves_the_previous_version_serving(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path), keep_versions=3)
    serving, next_one = _model(1), _model(2)
    _save(store, serving, 1000)
    # what a kill during the next save leaves: a temporary folder with some of its files, and
    # possibly the new CURRENT written but not yet renamed into place
    partial = tmp_path / "mf" / f".tmp-{next_one.version}"
    partial.mkdir()
    (partial / "user_vectors.npy").write_bytes(b"\x93NUMPY half")
    (tmp_path / "mf" / "CURRENT.tmp").write_text(next_one.version)

    loaded = ModelStore(str(tmp_path), keep_versions=3).load_all()
    assert sorted(loaded) == ["mf"]
    _assert_same(loaded["mf"], serving)

    # the next save of that version completes over the leftovers, and cleans them up
    store.save(next_one)
    assert _current(tmp_path) == next_one.version
    assert not partial.exists()
    assert _versions(tmp_path) == {serving.version, next_one.version}
    _assert_same(ModelStore(str(tmp_path), keep_versions=3).load_all()["mf"], next_one)


def test_a_current_naming_a_missing_version_serves_the_newest_intact_one(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path), keep_versions=3)
    first, second = _model(1), _model(2)
    _save(store, first, 2000)
    _save(store, second, 1000)  # older on disk, though saved last
    (tmp_path / "mf" / "CURRENT").write_text("0123456789abcdef")
    assert store.load_all()["mf"].version == first.version


def _hidden(root: Path, name: str = "mf") -> set[str]:
    return {path.name for path in (root / name).iterdir() if path.name.startswith(".")}


def test_a_staged_version_never_serves_and_a_start_deletes_it(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path), keep_versions=3)
    older, serving, staged = _model(1), _model(2), _model(3)
    _save(store, older, 1000)
    _save(store, serving, 2000)
    store.stage(staged)  # written in full, newer than any other, never promoted (a Fit that was cancelled)
    assert _hidden(tmp_path) == {f".staged-{staged.version}"} and _current(tmp_path) == serving.version
    _flip(tmp_path / "mf" / serving.version / "item_vectors.npy", -5)  # and CURRENT's version is damaged
    loaded = ModelStore(str(tmp_path), keep_versions=3).load_all()
    _assert_same(loaded["mf"], older)  # the newest intact *promoted* version, not the staged one
    assert not _hidden(tmp_path)


def test_a_kill_after_the_commit_is_finished_by_the_next_start(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path), keep_versions=3)
    serving, promoted = _model(1), _model(2)
    _save(store, serving, 1000)
    store.stage(promoted)
    (tmp_path / "mf" / "CURRENT").write_text(promoted.version)  # the commit, then the kill before the rename
    loaded = ModelStore(str(tmp_path), keep_versions=3).load_all()
    _assert_same(loaded["mf"], promoted)
    assert _versions(tmp_path) == {serving.version, promoted.version} and not _hidden(tmp_path)


def test_discard_removes_only_what_stage_wrote_for_a_version_not_promoted(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path), keep_versions=3)
    first, second = _model(1), _model(2)
    _save(store, first, 1000)
    _save(store, second, 2000)
    for model in (first, second):  # a Fit that reproduced a promoted version reuses its folder...
        store.stage(model)
        assert not _hidden(tmp_path)
        store.discard(model)  # ...and its cancellation leaves that folder alone
    assert _versions(tmp_path) == {first.version, second.version}
    third = _model(3)
    store.stage(third)
    (tmp_path / "mf" / "CURRENT").write_text(third.version)  # being promoted: discard leaves it
    store.discard(third)
    assert _hidden(tmp_path) == {f".staged-{third.version}"}


def test_a_fit_of_a_damaged_versions_content_writes_it_again(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path), keep_versions=3)
    model = _model(1)
    folder = _save(store, model, 1000)
    _flip(folder / "user_vectors.npy", -1)
    store.save(model)  # the same version again: its damaged folder is replaced, not reused
    _assert_same(ModelStore(str(tmp_path), keep_versions=3).load_all()["mf"], model)
    assert not _hidden(tmp_path)


def test_a_version_saved_before_rating_units_loads_with_its_version(tmp_path: Path) -> None:
    """Versions written before meta.json had a rating unit (and with int64 seen items) keep their hash."""
    store = ModelStore(str(tmp_path), keep_versions=3)
    model = _model(1)
    legacy = dataclasses.replace(model, seen_items=model.seen_items.astype(np.int64))
    folder = store.save(legacy)
    meta = json.loads((folder / "meta.json").read_text())
    del meta["rating_unit"]
    (folder / "meta.json").write_text(json.dumps(meta))
    loaded = store.load_all()["mf"]
    assert loaded.version == legacy.version and loaded.rating_unit == 1.0
