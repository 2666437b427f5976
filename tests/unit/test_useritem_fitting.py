"""A Fit changes the serving model only by promotion, after training and writing its version: a Fit whose
caller leaves, or that fails, at any step before promotion (reading, training, writing, a disk that fails)
changes nothing on disk or in memory, also for a worker restarted on the same directory; a caller who
leaves once promotion has started finds it completed; a stalled caller frees the Fit slot; training that
produces non-finite numbers fails; declared rating scales are checked, and any scale trains like 0.5-5.

The worker's parts are called in-process; steps are held (a threading.Event in a patched store method) to
land a cancellation exactly where it is tested, instead of racing a timer."""

import asyncio
import dataclasses
import errno
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from embeddings.v1 import recommender_pb2 as rec

from services.common.errors import Aborted, InvalidArgument, ServiceError
from services.useritem import store as store_module
from services.useritem import training as training_module
from services.useritem.settings import UserItemSettings
from services.useritem.store import ModelStore
from tests.unit.test_useritem_service import _CONTEXT, Worker, _fit, _messages, _stream, _worker
from tests.unit.useritem_data import Planted, one_torch_thread, planted

WAIT_S = 30.0  # generous: a step that is released, or a Fit that is freed, is over in well under a second


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


def _hidden(worker: Worker) -> list[str]:
    return [path.name for path in (worker.models / "mf").iterdir() if path.name.startswith(".")]


class _Held:
    """Holds a store method on the fit thread until released: `before` (not yet run) or after it ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, method: str, before: bool) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        real = getattr(ModelStore, method)

        def held(store: ModelStore, *args: Any) -> Any:
            if before:
                self._hold()
            result = real(store, *args)
            if not before:
                self._hold()
            return result

        monkeypatch.setattr(ModelStore, method, held)

    def _hold(self) -> None:
        self.reached.set()
        assert self.release.wait(WAIT_S), "the test never released the held step"

    async def wait_reached(self) -> None:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, self.reached.wait, WAIT_S), "the Fit never got there"

    async def leave(self, fit: "asyncio.Task[list[rec.FitProgress]]") -> None:
        """The caller of the held `fit` leaves (its task is cancelled), then the held step goes on."""
        fit.cancel()
        self.release.set()
        with pytest.raises(asyncio.CancelledError):
            await fit


async def _fit_thread_idle(worker: Worker) -> None:
    """Wait until the fit thread has finished what it was doing (a discard runs there after a held step)."""
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.run_in_executor(worker.fitter._thread, lambda: None), WAIT_S)


def _consume(worker: Worker, messages: list[rec.FitRequest]) -> "asyncio.Task[list[rec.FitProgress]]":
    async def consume() -> list[rec.FitProgress]:
        return [progress async for progress in worker.service.Fit(_stream(messages), _CONTEXT)]

    return asyncio.create_task(consume())


# Cancelled ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "before"),
    [("stage", True), ("stage", False)],
    ids=["after the last epoch, before the write", "after the write, before promotion"],
)
async def test_a_fit_whose_caller_leaves_before_promotion_changes_nothing(
    served: Worker, monkeypatch: pytest.MonkeyPatch, method: str, before: bool
) -> None:
    await _serve_first(served)
    before_state = _state(served)
    held = _Held(monkeypatch, method, before)
    task = _consume(served, _messages(planted(seed=8)))
    await held.wait_reached()
    await held.leave(task)
    await _fit_thread_idle(served)
    assert _state(served) == before_state
    assert _restarted(served) == before_state["serving"]
    # and the slot is free: the next Fit of the same data serves
    done = (await _fit(served, _messages(planted(seed=8))))[-1]
    assert served.catalog.get("mf").version == done.model.version == served.current()


@pytest.mark.parametrize("before", [True, False], ids=["before the commit", "after the commit"])
async def test_a_caller_who_leaves_during_promotion_finds_it_completed(
    served: Worker, monkeypatch: pytest.MonkeyPatch, before: bool
) -> None:
    old = await _serve_first(served)
    held = _Held(monkeypatch, "promote", before)
    task = _consume(served, _messages(planted(seed=8)))
    await held.wait_reached()
    await held.leave(task)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while served.catalog.get("mf").version == old:
        assert loop.time() < deadline, "the promotion the caller left did not complete"
        await asyncio.sleep(0.01)
    new = served.catalog.get("mf").version
    assert served.current() == new and new in served.versions() and not _hidden(served)
    assert _restarted(served) == {"mf": new}


# Failed ------------------------------------------------------------------------------------------------


def _failing(real: Callable[..., Any], fails: Callable[..., bool], error: OSError) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        if fails(*args):
            raise error
        return real(*args)

    return call


def _nth(n: int) -> Callable[..., bool]:
    calls = iter(range(1, 10_000))
    return lambda *args: next(calls) == n


_REAL_REPLACE = os.replace
_ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/secret/data/dir/mf/.tmp-x/user_vectors.npy")
_EIO = OSError(errno.EIO, os.strerror(errno.EIO), "/secret/data/dir/mf/CURRENT.tmp")

# (case, the function of store.py to break, which call fails, the error): a write fails before the
# commit point (CURRENT replaced), so the Fit fails and nothing changes
_BEFORE_COMMIT: list[tuple[str, str, Callable[..., bool], OSError]] = [
    ("the first array", "write_parts_synced", _nth(1), _ENOSPC),
    ("ids.json", "write_synced", _nth(1), _ENOSPC),
    ("meta.json", "write_synced", _nth(2), _EIO),
    ("CURRENT.tmp", "write_synced", _nth(3), _ENOSPC),
    ("the version folder's fsync", "fsync_dir", _nth(1), _EIO),
    ("the staged folder's rename", "replace", lambda src, dst: Path(dst).name.startswith(".staged-"), _EIO),
    ("CURRENT's rename", "replace", lambda src, dst: Path(dst).name == "CURRENT", _EIO),
]


@pytest.mark.parametrize(
    ("case", "name", "fails", "error"), _BEFORE_COMMIT, ids=[c[0] for c in _BEFORE_COMMIT]
)
async def test_a_disk_that_fails_before_the_commit_fails_the_fit_and_changes_nothing(
    served: Worker, monkeypatch: pytest.MonkeyPatch, case: str, name: str, fails: Any, error: OSError
) -> None:
    await _serve_first(served)
    before_state = _state(served)
    if name == "replace":
        monkeypatch.setattr(store_module.os, "replace", _failing(_REAL_REPLACE, fails, error))
    else:
        monkeypatch.setattr(store_module, name, _failing(getattr(store_module, name), fails, error))
    with pytest.raises(ServiceError) as failed:
        await _fit(served, _messages(planted(seed=8)))
    expected = grpc.StatusCode.RESOURCE_EXHAUSTED if error.errno == errno.ENOSPC else grpc.StatusCode.INTERNAL
    assert failed.value.code == expected
    assert error.strerror in failed.value.message and "USERITEM_DATA_DIR" in failed.value.message
    assert "/secret" not in failed.value.message and str(served.root) not in failed.value.message
    assert _state(served) == before_state
    assert _restarted(served) == before_state["serving"]
    monkeypatch.undo()
    done = (await _fit(served, _messages(planted(seed=8))))[-1]  # the disk is back: the same Fit works
    assert served.catalog.get("mf").version == done.model.version == served.current()


@pytest.mark.parametrize("step", ["fsync after CURRENT", "the staged folder's final rename"])
async def test_a_disk_that_fails_after_the_commit_completes_the_promotion(
    served: Worker, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    await _serve_first(served)
    if step == "fsync after CURRENT":
        monkeypatch.setattr(store_module, "fsync_dir", _failing(store_module.fsync_dir, _nth(3), _EIO))
    else:
        final = lambda src, dst: Path(src).name.startswith(".staged-") and not Path(dst).name.startswith(".")  # noqa: E731
        monkeypatch.setattr(store_module.os, "replace", _failing(_REAL_REPLACE, final, _EIO))
    done = (await _fit(served, _messages(planted(seed=8))))[-1]
    new = done.model.version
    assert served.catalog.get("mf").version == new == served.current()
    monkeypatch.undo()
    # a start finishes what the failure left (the rename), and serves what CURRENT names
    assert _restarted(served) == {"mf": new}
    assert new in served.versions() and not _hidden(served)


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


# Stalled -----------------------------------------------------------------------------------------------


def _stalled(messages: list[rec.FitRequest]) -> tuple[AsyncIterator[rec.FitRequest], asyncio.Event]:
    """A stream that sends `messages`, then neither sends nor ends until the event is set."""
    sent_all = asyncio.Event()

    async def stream() -> AsyncIterator[rec.FitRequest]:
        for message in messages:
            yield message
        sent_all.set()
        await asyncio.Event().wait()

    return stream(), sent_all


@pytest.mark.parametrize("sent", ["nothing", "one message", "a file's path"])
async def test_a_stalled_fit_is_aborted_after_the_idle_timeout_and_frees_the_slot(
    served: Worker, monkeypatch: pytest.MonkeyPatch, sent: str
) -> None:
    await _serve_first(served)
    before_state = _state(served)
    idle = 0.5
    monkeypatch.setattr(served.fitter._settings, "fit_idle_timeout_s", idle)
    (served.root / "fit" / "some.csv").write_text("user_id,item_id,rating\nu1,i1,3\n")
    first = {
        "nothing": [],
        "one message": _messages(planted(seed=8), model="stalled-model")[:1],
        "a file's path": [rec.FitRequest(path="some.csv", model="stalled-model")],
    }[sent]
    stream, _ = _stalled(first)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Aborted) as aborted:
        await asyncio.wait_for(_collect(served, stream), WAIT_S)
    assert loop.time() - started >= idle  # not before the timeout
    assert aborted.value.code == grpc.StatusCode.ABORTED
    assert (
        "USERITEM_FIT_IDLE_TIMEOUT_S" in aborted.value.message and "changed nothing" in aborted.value.message
    )
    assert _state(served) == before_state
    done = (await _fit(served, _messages(planted(seed=8))))[-1]  # the slot is free
    assert done.done and served.catalog.get("mf").version == done.model.version


async def test_a_second_fit_while_one_stalls_is_refused_without_naming_its_model(
    served: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(served.fitter._settings, "fit_idle_timeout_s", 60.0)
    stream, sent_all = _stalled(_messages(planted(seed=8), model="alices-secret-model")[:2])
    stalled = asyncio.create_task(_collect(served, stream))
    await asyncio.wait_for(sent_all.wait(), WAIT_S)
    with pytest.raises(ServiceError) as refused:
        await _fit(served, _messages(planted(seed=9), model="bob"))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "alices" not in refused.value.message and "secret" not in refused.value.message
    assert "a Fit is running" in refused.value.message
    stalled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stalled
    assert served.versions("alices-secret-model") == set()


async def _collect(worker: Worker, stream: AsyncIterator[rec.FitRequest]) -> list[rec.FitProgress]:
    return [progress async for progress in worker.service.Fit(stream, _CONTEXT)]


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
