"""A Fit's rating scale and its training's numbers: a declared scale is checked (both bounds or none,
finite, min < max, within float32's reach), any usable scale trains like 0.5-5, and training that produces
non-finite numbers fails the Fit and changes nothing on disk or in memory, also for a worker restarted on
the same directory. The worker's parts are called in-process."""

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from embeddings.v1 import recommender_pb2 as rec

from services.common.errors import InvalidArgument, ServiceError
from services.useritem import training as training_module
from services.useritem.settings import UserItemSettings
from services.useritem.store import ModelStore
from tests.unit.test_useritem_service import _CONTEXT, Worker, _fit, _messages, _worker
from tests.unit.useritem_data import Planted, one_torch_thread, planted


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Worker]:
    """A worker serving version 1 of model "mf" (trained from planted data, seed 7)."""
    worker = _worker(tmp_path, epochs=6, patience=6)
    yield worker
    worker.close()


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    fresh = _worker(tmp_path)
    yield fresh
    fresh.close()


async def _serve_first(worker: Worker) -> str:
    done = (await _fit(worker, _messages(planted(seed=7))))[-1]
    assert done.done
    return str(done.model.version)


def _state(worker: Worker) -> dict[str, Any]:
    """What a Fit may change: the version in memory, CURRENT, every file under the model directory."""
    root = worker.models
    files = sorted(str(path.relative_to(root)) for path in root.rglob("*")) if root.is_dir() else []
    serving = {model.name: model.version for model in worker.catalog.models}
    return {"serving": serving, "current": worker.current(), "files": files}


def _restarted(worker: Worker) -> dict[str, str]:
    """The versions a worker started on the same directory serves."""
    return {name: model.version for name, model in ModelStore(str(worker.models), 3).load_all().items()}


# Training that diverges --------------------------------------------------------------------------------


async def test_training_that_produces_non_finite_numbers_fails_and_changes_nothing(
    served: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _serve_first(served)
    before_state = _state(served)
    # a loss that overflows: the first step's predictions are dot products of vectors ~1e20
    monkeypatch.setattr(served.fitter._settings, "init_std", 1e20)
    with pytest.raises(
        ServiceError, match=r"training diverged: the train loss became (nan|inf) in epoch 1"
    ) as failed:
        await _fit(served, _messages(planted(seed=8)))
    assert failed.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "USERITEM_LEARNING_RATE" in failed.value.message and "nothing was saved" in failed.value.message
    monkeypatch.undo()

    # a parameter that becomes NaN in an optimiser step, with a loss still finite when it was computed
    class Poisoned(training_module.torch.optim.Adam):
        def step(self, closure: Any = None) -> Any:
            result = super().step(closure)
            self.param_groups[0]["params"][3].data[5] = float("nan")  # an item bias
            return result

    monkeypatch.setattr(training_module.torch.optim, "Adam", Poisoned)
    monkeypatch.setattr(served.fitter._settings, "batch_size", 100_000)  # one step per epoch
    with pytest.raises(ServiceError, match=r"a parameter \(the item biases\) became nan in epoch 1"):
        await _fit(served, _messages(planted(seed=8)))
    assert _state(served) == before_state
    assert _restarted(served) == before_state["serving"]


# Rating scales -----------------------------------------------------------------------------------------


_BAD_SCALES: list[tuple[str, dict[str, float], str]] = [
    ("only rating_max", {"rating_max": 1e-300}, r"rating_max is set without rating_min"),
    ("only rating_min, 0", {"rating_min": 0.0}, r"rating_min is set without rating_max"),
    ("a bound past float32 (3.4e38)", {"rating_min": 0.0, "rating_max": 3.4e38}, r"within ±1e\+09"),
    ("a bound past 1e9", {"rating_min": -2e9, "rating_max": 5.0}, r"within ±1e\+09"),
    (
        "1e-300 arrives as 0",
        {"rating_min": 0.0, "rating_max": 1e-300},
        r"\[0, 0\] is not valid: rating_min must be below",
    ),
    ("nan", {"rating_min": float("nan"), "rating_max": 5.0}, r"both bounds must be finite"),
    ("infinite", {"rating_min": 0.0, "rating_max": float("inf")}, r"both bounds must be finite"),
    ("inverted", {"rating_min": 5.0, "rating_max": 1.0}, r"\[5, 1\] is not valid: rating_min must be below"),
    ("too narrow", {"rating_min": 0.0, "rating_max": 1e-7}, r"at least 1e-06 wide"),
    ("too narrow for its magnitude", {"rating_min": 1e6, "rating_max": 1e6 + 50}, r"at least 0\.0001 times"),
]


@pytest.mark.parametrize(("case", "scale", "message"), _BAD_SCALES, ids=[c[0] for c in _BAD_SCALES])
async def test_a_declared_scale_training_cannot_use_is_refused(
    served: Worker, case: str, scale: dict[str, float], message: str
) -> None:
    await _serve_first(served)
    before_state = _state(served)
    with pytest.raises(InvalidArgument, match=message):
        await _fit(served, _messages(planted(seed=8), **scale))
    assert _state(served) == before_state


def test_the_default_scale_is_checked_like_a_declared_one() -> None:
    with pytest.raises(ValueError, match=r"within ±1e\+09"):
        UserItemSettings(rating_min=0.0, rating_max=3.4e38)
    with pytest.raises(ValueError, match=r"rating_min must be below"):
        UserItemSettings(rating_min=5.0, rating_max=5.0)


def _rescaled(truth: Planted, low: float, high: float) -> list[rec.FitRequest]:
    """The planted ratings (0.5 to 5) mapped onto [low, high], declared as the Fit's scale."""
    mapped = low + (truth.ratings - 0.5) / 4.5 * (high - low)
    moved = dataclasses.replace(truth, ratings=mapped)
    return _messages(moved, rating_min=low, rating_max=high)


def _predicted(model: Any, user: str) -> np.ndarray:
    """The model's predicted ratings of `user` for items i0..i99, in that order."""
    row = model.user_index[user]
    items = np.array([model.item_index[f"i{item}"] for item in range(100)])
    dots = model.item_vectors[items].astype(np.float64) @ model.user_vectors[row]
    return model.global_mean + model.user_bias[row] + model.item_bias[items] + dots


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (-1000.0, 1000.0), (1e6, 1e6 + 450.0)])
async def test_any_usable_scale_trains_like_the_default_one(worker: Worker, low: float, high: float) -> None:
    truth = planted(seed=7)
    stars_done = (await _fit(worker, _messages(truth, model="stars")))[-1]
    scaled_done = (await _fit(worker, _rescaled(truth, low, high)))[-1]
    unit = (high - low) / 4.5
    # the same fit in other units: the RMSE scales with the unit, predictions map back onto 0.5-5 (measured:
    # RMSE ratios 1 - 2e-4 at worst, predictions within 0.0016 of the 0.5-5 model's, fold-ins 10 of 10)
    assert scaled_done.validation_rmse == pytest.approx(stars_done.validation_rmse * unit, rel=0.005)
    stars, scaled = worker.catalog.get("stars"), worker.catalog.get("mf")
    assert scaled.rating_unit == pytest.approx(unit) and stars.rating_unit == 1.0
    for user in ("u0", "u17", "u199"):
        mapped = (_predicted(scaled, user) - low) / unit + 0.5
        np.testing.assert_allclose(mapped, _predicted(stars, user), atol=0.01)
    # fold-in penalises in the same units: the user's ratings, rescaled, fold in to the same ranking
    mine = [i for i in truth.interactions() if i.user_id == "u3"]
    rescaled = [
        rec.Interaction(item_id=i.item_id, rating=low + (i.rating - 0.5) / 4.5 * (high - low)) for i in mine
    ]
    folded = await worker.service.FoldIn(rec.FoldInRequest(interactions=mine, model="stars", k=10), _CONTEXT)
    again = await worker.service.FoldIn(rec.FoldInRequest(interactions=rescaled, k=10), _CONTEXT)
    assert len({hit.id for hit in folded.items} & {hit.id for hit in again.items}) >= 9
