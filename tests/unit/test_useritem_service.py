"""The Recommender and Encoder servicers of the user-item worker, called directly: Fit streams progress
and swaps the serving version only once it is saved; a failed, cancelled or concurrent Fit changes
nothing; Recommend, SimilarItems, FoldIn and Encode answer from the serving version and refuse bad
requests with the status and the field to fix."""

import asyncio
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, ServiceError
from services.common.vectors import from_wire
from services.encoder.service import EncoderService
from services.useritem.catalog import Catalog
from services.useritem.encoding import TrainedVersions
from services.useritem.fitting import Fitter
from services.useritem.model import TrainedModel
from services.useritem.service import RecommenderService
from services.useritem.settings import UserItemSettings
from services.useritem.store import ModelStore
from tests.unit.useritem_data import Planted, one_torch_thread, planted


class _Context:
    """What the servicers read of their context: no deadline."""

    def time_remaining(self) -> None:
        return None


_CONTEXT: Any = _Context()
_CHUNK = 1000  # interactions per FitRequest


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@dataclass
class Worker:
    root: Path
    settings: UserItemSettings
    store: ModelStore
    catalog: Catalog
    fitter: Fitter
    service: RecommenderService
    encoder: EncoderService

    @property
    def models(self) -> Path:
        return Path(self.settings.data_dir)

    def versions(self, name: str = "mf") -> set[str]:
        folder = self.models / name
        return {path.name for path in folder.iterdir() if path.is_dir()} if folder.is_dir() else set()

    def current(self, name: str = "mf") -> str | None:
        pointer = self.models / name / "CURRENT"
        return pointer.read_text() if pointer.exists() else None

    def close(self) -> None:
        self.fitter.close()
        self.service.close()


def _worker(root: Path, **overrides: Any) -> Worker:
    values: dict[str, Any] = {
        "data_dir": str(root / "models"),
        "fit_dir": str(root / "fit"),
        "factors": 8,
        "epochs": 40,
        "batch_size": 256,
        "learning_rate": 0.02,
        "l2": 1.0,
        "init_std": 0.1,
        "patience": 3,
        "max_k": 50,
        "max_inputs_per_request": 64,
        "max_id_bytes": 64,
        "default_kind": "mf",  # these tests are of matrix factorisation (EASE: test_useritem_ease.py)
    }
    values.update(overrides)
    settings = UserItemSettings(**values)
    (root / "fit").mkdir(parents=True, exist_ok=True)
    store = ModelStore(settings.data_dir, settings.keep_versions)
    catalog = Catalog(settings.default_model)
    fitter = Fitter(catalog, store, settings)
    return Worker(
        root,
        settings,
        store,
        catalog,
        fitter,
        RecommenderService(catalog, fitter, settings),
        EncoderService(TrainedVersions(catalog), settings.max_inputs_per_request, settings.stream_window),
    )


def _messages(truth: Planted, **first: Any) -> list[rec.FitRequest]:
    """The planted interactions as a Fit stream; `first` sets the first message's other fields."""
    chunks = list(truth.chunks(_CHUNK))
    return [
        rec.FitRequest(interactions=chunks[0], **first),
        *(rec.FitRequest(interactions=c) for c in chunks[1:]),
    ]


async def _stream(messages: Sequence[rec.FitRequest]) -> AsyncIterator[rec.FitRequest]:
    for message in messages:
        yield message


async def _fit(worker: Worker, messages: Sequence[rec.FitRequest]) -> list[rec.FitProgress]:
    return [progress async for progress in worker.service.Fit(_stream(messages), _CONTEXT)]


@dataclass
class Served:
    worker: Worker
    truth: Planted  # what model "mf" (explicit, the default) learnt from
    implicit_truth: Planted  # what model "bpr" (implicit) learnt from

    @property
    def mf(self) -> TrainedModel:
        return self.worker.catalog.get("mf")

    def interactions(self, user: int) -> list[rec.Interaction]:
        return [i for i in self.truth.interactions() if i.user_id == f"u{user}"]


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    """A worker serving two trained models; the tests that use it must leave it as they found it."""
    worker = _worker(tmp_path_factory.mktemp("served"))
    truth, implicit_truth = planted(seed=7), planted(implicit=True, seed=8)
    await _fit(worker, _messages(truth))
    await _fit(worker, _messages(implicit_truth, model="bpr", implicit=True))
    yield Served(worker, truth, implicit_truth)
    worker.close()


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    fresh = _worker(tmp_path)
    yield fresh
    fresh.close()


# Fit ---------------------------------------------------------------------------------------------------


async def test_fit_streams_each_epoch_then_the_saved_serving_version(worker: Worker) -> None:
    truth = planted(seed=7)
    messages = _messages(truth)
    # 40 duplicates: older ratings of pairs sent again later, which the counts must not include
    duplicates = [
        rec.Interaction(user_id=i.user_id, item_id=i.item_id, rating=0.5, timestamp=-1)
        for i in truth.interactions()[::150]
    ]
    messages.append(rec.FitRequest(interactions=duplicates))
    progress = await _fit(worker, messages)

    *epochs, done = progress
    assert [p.epoch for p in epochs] == list(range(1, len(epochs) + 1))
    assert all(not p.done and p.epochs == 40 and p.validation_rmse > 0 for p in epochs)
    assert 3 < len(epochs) <= 40
    assert epochs[0].train_loss > epochs[-1].train_loss
    assert done.done and done.epochs == 40
    assert (done.users, done.items, done.interactions) == (200, 100, 6000)
    # the version kept is the best epoch's
    assert done.validation_rmse == min(p.validation_rmse for p in epochs)
    assert done.epoch == next(p.epoch for p in epochs if p.validation_rmse == done.validation_rmse)
    assert 0 < done.validation_recall_at_10 <= 1

    serving = worker.catalog.get("")
    assert (done.model.id, done.model.version, done.model.space) == ("mf", serving.version, "useritem-mf")
    assert serving.metrics.interactions == 6000 and len(serving.seen_items) == 6000
    assert worker.current() == serving.version and worker.versions() == {serving.version}
    assert worker.store.load_all()["mf"].version == serving.version


async def test_a_fit_from_a_file_learns_what_the_same_stream_learns(worker: Worker) -> None:
    truth = planted(seed=7)
    frame = pd.DataFrame(
        {
            "user_id": [f"u{row}" for row in truth.user_rows],
            "item_id": [f"i{row}" for row in truth.item_rows],
            # the float32 values a stream carries, so both fits see the same ratings
            "rating": truth.ratings.astype(np.float32).astype(np.float64),
        }
    )
    frame.to_csv(worker.root / "fit" / "ratings.csv", index=False)
    from_file = await _fit(worker, [rec.FitRequest(path="ratings.csv", model="fromfile")])
    streamed = await _fit(worker, _messages(truth, model="streamed"))
    assert from_file[-1].done and from_file[-1].model.id == "fromfile"
    assert from_file[-1].interactions == 6000
    # same interactions, same seed: the same model, bit for bit
    assert from_file[-1].model.version == streamed[-1].model.version
    assert worker.versions("fromfile") == {from_file[-1].model.version}

    with pytest.raises(InvalidArgument, match=r"is outside the worker's fit directory"):
        await _fit(worker, [rec.FitRequest(path="../fit/../../etc/passwd")])
    with pytest.raises(NotFound, match=r"no file 'missing\.csv'"):
        await _fit(worker, [rec.FitRequest(path="missing.csv")])
    with pytest.raises(InvalidArgument, match=r"takes one message; it had more"):
        await _fit(worker, [rec.FitRequest(path="ratings.csv"), rec.FitRequest()])


def _nan_in_third_message(truth: Planted) -> list[rec.FitRequest]:
    messages = _messages(truth)
    messages[2].interactions[5].rating = math.nan
    return messages


def _model_in_second_message(truth: Planted) -> list[rec.FitRequest]:
    messages = _messages(truth)
    messages[1].model = "other"
    return messages


def _scale_in_third_message(truth: Planted) -> list[rec.FitRequest]:
    messages = _messages(truth, rating_min=0.5, rating_max=5.0)
    messages[2].rating_min, messages[2].rating_max = 0.0, 5.0
    return messages


# (case, the Fit stream, the error it must raise)
_BAD_FITS: list[tuple[str, Any, type[ServiceError], str]] = [
    (
        "nan in the 3rd message",
        _nan_in_third_message,
        InvalidArgument,
        r"interactions\[2005\]\.rating is nan",
    ),
    (
        "a later message names a model",
        _model_in_second_message,
        InvalidArgument,
        r"FitRequest 1 sets path, or a model, kind, parameters, implicit or rating scale other than the first",
    ),
    (
        "a later message declares another scale",
        _scale_in_third_message,
        InvalidArgument,
        r"FitRequest 2 sets path, or a model, kind, parameters, implicit or rating scale other than the first",
    ),
    ("no messages", lambda truth: [], InvalidArgument, r"the Fit stream had no messages"),
    (
        "too few interactions",
        lambda truth: [rec.FitRequest(interactions=truth.interactions()[::300][:15])],  # 15 users
        InvalidArgument,
        r"at least 20 distinct",
    ),
    (
        "bad model name",
        lambda truth: _messages(truth, model="../mf"),
        InvalidArgument,
        r"model name '\.\./mf' is not valid",
    ),
    (
        "inverted rating scale",
        lambda truth: _messages(truth, rating_min=5.0, rating_max=1.0),
        InvalidArgument,
        r"rating scale \[5, 1\] is not valid",
    ),
    (
        "ratings outside a declared scale",
        lambda truth: _messages(truth, rating_min=1.0, rating_max=5.0),
        InvalidArgument,
        r"outside the rating scale \[1, 5\]",
    ),
    (
        "path and interactions",
        lambda truth: [rec.FitRequest(path="ratings.csv", interactions=truth.interactions()[:30])],
        InvalidArgument,
        r"both a path and interactions",
    ),
]


@pytest.mark.parametrize(("case", "stream", "error", "message"), _BAD_FITS, ids=[c for c, *_ in _BAD_FITS])
async def test_a_failed_fit_leaves_the_serving_version_and_the_disk_as_they_were(
    served: Served, case: str, stream: Any, error: type[ServiceError], message: str
) -> None:
    worker = served.worker
    before = worker.catalog.get("")
    versions, current = worker.versions(), worker.current()
    with pytest.raises(error, match=message):
        await _fit(worker, stream(served.truth))
    assert worker.catalog.get("") is before
    assert worker.catalog.get("").version == before.version == current
    assert worker.versions() == versions and worker.current() == current
    assert sorted(path.name for path in worker.models.iterdir()) == ["bpr", "mf"]
    assert not any(path.name.startswith(".tmp") for path in (worker.models / "mf").iterdir())


async def test_later_messages_may_repeat_what_the_first_set(worker: Worker) -> None:
    messages = _messages(planted(seed=7), model="mf", rating_min=0.5, rating_max=5.0)
    for message in messages[1:]:
        message.model, message.rating_min, message.rating_max = "mf", 0.5, 5.0
    messages[1].model = ""  # and a later message that names no model names none
    done = (await _fit(worker, messages))[-1]
    assert done.done and done.model.id == "mf"


class _HeldStream:
    """A Fit stream that sends its first message, then waits for `release` before the rest."""

    def __init__(self, messages: Sequence[rec.FitRequest]) -> None:
        self.messages = messages
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[rec.FitRequest]:
        yield self.messages[0]
        self.started.set()
        await self.release.wait()
        for message in self.messages[1:]:
            yield message


async def test_a_second_fit_while_one_runs_is_resource_exhausted(worker: Worker) -> None:
    small = planted(users=30, items=20, per_user=8, seed=2)
    held = _HeldStream(_messages(planted(seed=7)))
    first = worker.service.Fit(held.__aiter__(), _CONTEXT)

    async def next_progress() -> rec.FitProgress:
        return await anext(first)

    reading = asyncio.create_task(next_progress())
    await asyncio.wait_for(held.started.wait(), 10)
    # while the first Fit is still reading its stream
    with pytest.raises(ResourceExhausted, match=r"a Fit is running on this worker") as raised:
        await _fit(worker, _messages(small, model="small"))
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "mf" not in raised.value.message  # the running Fit's model is its caller's business
    held.release.set()
    progress = [await asyncio.wait_for(reading, 30)]
    # while it trains
    assert progress[0].epoch == 1 and not progress[0].done
    with pytest.raises(ResourceExhausted):
        await _fit(worker, _messages(small, model="small"))
    progress += [p async for p in first]
    assert progress[-1].done and progress[-1].model.version == worker.catalog.get("mf").version
    assert worker.versions("small") == set()
    # once it is done, the next Fit runs
    done = (await _fit(worker, _messages(small, model="small")))[-1]
    assert done.done and worker.catalog.get("small").version == done.model.version


async def test_a_fit_whose_caller_goes_away_saves_nothing(tmp_path: Path) -> None:
    # long enough that it cannot end on its own before the cancellation lands
    worker = _worker(tmp_path, epochs=500, patience=500)
    try:
        truth = planted(seed=7)
        first_epoch = asyncio.Event()

        async def consume() -> None:
            async for _ in worker.service.Fit(_stream(_messages(truth)), _CONTEXT):
                first_epoch.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first_epoch.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the training was stopped, not left running on the fit thread (500 epochs would take many
        # seconds): that thread is free at once, and nothing was saved or is serving
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(worker.fitter._thread, lambda: None), 3)
        assert worker.versions() == set() and worker.current() is None
        with pytest.raises(ServiceError) as untrained:
            worker.catalog.get("")
        assert untrained.value.code == grpc.StatusCode.FAILED_PRECONDITION
        # and the worker is not left busy: the next Fit is read (and refused for its own fault)
        with pytest.raises(InvalidArgument, match=r"the Fit stream had no messages"):
            await _fit(worker, [])
    finally:
        worker.close()


# Recommend ---------------------------------------------------------------------------------------------


async def _recommend(served: Served, user: str, k: int = 10, **fields: Any) -> rec.RecommendResponse:
    return await served.worker.service.Recommend(rec.RecommendRequest(user_id=user, k=k, **fields), _CONTEXT)


async def test_recommend_ranks_unseen_items_by_predicted_rating(served: Served) -> None:
    model = served.mf
    for user in (0, 17, 199):
        response = await _recommend(served, f"u{user}", k=10)
        assert (response.model.id, response.model.version) == ("mf", model.version)
        seen = {f"i{item}" for item in served.truth.seen(user)}
        ids = [hit.id for hit in response.items]
        assert len(ids) == 10 and not seen & set(ids)
        assert all(hit.kind == pb.INPUT_KIND_ITEM for hit in response.items)
        # each score is the predicted rating: mean + user bias + item bias + dot(user, item), clamped to
        # the rating scale
        row = model.user_index[f"u{user}"]
        columns = np.array([model.item_index[i] for i in ids])
        predicted = np.clip(
            model.global_mean
            + model.user_bias[row]
            + model.item_bias[columns]
            + model.item_vectors[columns] @ model.user_vectors[row],
            model.rating_min,
            model.rating_max,
        )
        np.testing.assert_allclose([hit.score for hit in response.items], predicted, rtol=1e-5, atol=1e-5)
        # and they are the 10 best unseen items
        unseen = np.array([model.item_index[f"i{i}"] for i in range(100) if f"i{i}" not in seen])
        scores = model.item_bias[unseen] + model.item_vectors[unseen] @ model.user_vectors[row]
        assert set(ids) == {model.items[unseen[j]] for j in np.argsort(-scores)[:10]}


async def test_include_seen_returns_seen_items_too(served: Served) -> None:
    seen = {f"i{item}" for item in served.truth.seen(3)}
    excluded = [hit.id for hit in (await _recommend(served, "u3", k=50)).items]
    assert len(excluded) == 50 and not seen & set(excluded)
    everything = [hit.id for hit in (await _recommend(served, "u3", k=50, include_seen=True)).items]
    assert len(everything) == 50
    # the best 50 of all 100 items hold some of the 30 this user rated, and the others are, in order,
    # the best unseen ones
    assert seen & set(everything)
    unseen = [item for item in everything if item not in seen]
    assert unseen == excluded[: len(unseen)]


@pytest.mark.parametrize("k", [0, 51])
async def test_recommend_k_out_of_range_is_invalid(served: Served, k: int) -> None:
    with pytest.raises(InvalidArgument, match=rf"k={k} is out of range; use 1\.\.50 \(USERITEM_MAX_K\)"):
        await _recommend(served, "u1", k=k)


async def test_recommend_for_an_unknown_user_is_not_found(served: Served) -> None:
    with pytest.raises(NotFound, match=r"user_id 'nobody' is not a user of model 'mf'"):
        await _recommend(served, "nobody")
    with pytest.raises(InvalidArgument, match=r"user_id is empty"):
        await _recommend(served, "")


async def test_an_unknown_model_is_invalid_and_an_untrained_default_is_a_failed_precondition(
    served: Served, worker: Worker
) -> None:
    with pytest.raises(InvalidArgument, match=r"unknown model 'nope'; models here: bpr, mf"):
        await _recommend(served, "u1", model="nope")
    with pytest.raises(ServiceError, match=r"default model 'mf' has not been trained yet") as untrained:
        await worker.service.Recommend(rec.RecommendRequest(user_id="u1", k=5), _CONTEXT)
    assert untrained.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(ServiceError) as untrained:
        await worker.service.SimilarItems(rec.SimilarItemsRequest(item_id="i1", k=5), _CONTEXT)
    assert untrained.value.code == grpc.StatusCode.FAILED_PRECONDITION
    # the implicit model answers by name
    response = await _recommend(served, "u1", model="bpr")
    assert response.model.id == "bpr" and len(response.items) == 10


# SimilarItems ------------------------------------------------------------------------------------------


async def test_similar_items_are_the_nearest_by_cosine_without_the_item_itself(served: Served) -> None:
    model = served.mf
    for item in ("i0", "i42", "i99"):
        response = await served.worker.service.SimilarItems(
            rec.SimilarItemsRequest(item_id=item, k=8), _CONTEXT
        )
        ids = [hit.id for hit in response.items]
        assert item not in ids and len(ids) == 8
        vectors = model.item_vectors / np.linalg.norm(model.item_vectors, axis=1, keepdims=True)
        cosine = vectors @ vectors[model.item_index[item]]
        cosine[model.item_index[item]] = -np.inf
        expected = [model.items[row] for row in np.argsort(-cosine)[:8]]
        assert ids == expected
        np.testing.assert_allclose(
            [hit.score for hit in response.items], np.sort(cosine)[::-1][:8], atol=1e-5
        )
    everything = await served.worker.service.SimilarItems(
        rec.SimilarItemsRequest(item_id="i5", k=50), _CONTEXT
    )
    assert "i5" not in {hit.id for hit in everything.items}


async def test_similar_items_refuses_unknown_items_and_bad_k(served: Served) -> None:
    service = served.worker.service
    with pytest.raises(NotFound, match=r"item_id 'u1' is not an item of model 'mf'"):
        await service.SimilarItems(rec.SimilarItemsRequest(item_id="u1", k=5), _CONTEXT)
    with pytest.raises(InvalidArgument, match=r"k=0 is out of range"):
        await service.SimilarItems(rec.SimilarItemsRequest(item_id="i1"), _CONTEXT)


# FoldIn ------------------------------------------------------------------------------------------------


async def _fold_in(
    served: Served, interactions: Sequence[rec.Interaction], **fields: Any
) -> rec.FoldInResponse:
    return await served.worker.service.FoldIn(
        rec.FoldInRequest(interactions=interactions, **fields), _CONTEXT
    )


async def test_fold_in_of_a_trained_users_interactions_recommends_like_that_user(served: Served) -> None:
    overlaps = []
    for user in range(0, 200, 20):
        trained = {hit.id for hit in (await _recommend(served, f"u{user}", k=10)).items}
        interactions = served.interactions(user)
        for interaction in interactions:
            interaction.user_id = "someone new"  # ignored
        folded = await _fold_in(served, interactions, k=10)
        ids = {hit.id for hit in folded.items}
        assert len(ids) == 10 and not ids & {i.item_id for i in interactions}
        overlaps.append(len(trained & ids))
    assert np.mean(overlaps) >= 8, overlaps  # measured 9.4 of 10 (8 to 10 per user)


async def test_fold_in_with_k_0_returns_just_the_vector(served: Served) -> None:
    interactions = served.interactions(5)[:6]
    response = await _fold_in(served, interactions)
    assert len(response.items) == 0 and response.model.version == served.mf.version
    vector = from_wire(response.vector)
    assert vector.shape == (8,) and np.linalg.norm(vector) > 0
    with_items = await _fold_in(served, interactions, k=5, include_seen=True)
    np.testing.assert_array_equal(from_wire(with_items.vector), vector)
    assert len(with_items.items) == 5


async def test_fold_in_counts_a_repeated_item_once_with_its_last_rating(served: Served) -> None:
    interactions = served.interactions(9)[:8]
    repeated = rec.Interaction(
        item_id=interactions[0].item_id, rating=5.0 if interactions[0].rating < 3 else 0.5
    )
    once = from_wire((await _fold_in(served, [*interactions[1:], interactions[0]])).vector)
    twice = from_wire((await _fold_in(served, [repeated, *interactions[1:], interactions[0]])).vector)
    np.testing.assert_allclose(twice, once, rtol=1e-6)
    changed = from_wire((await _fold_in(served, [*interactions, repeated])).vector)
    assert not np.allclose(changed, once, atol=1e-3)


@pytest.mark.parametrize(
    ("rating", "message"),
    [
        (math.nan, r"interactions\[2\]\.rating is nan"),
        (7.0, r"interactions\[2\]\.rating is 7\.0, outside the rating scale \[0\.5, 5\]"),
        (0.0, r"interactions\[2\]\.rating is 0\.0"),
    ],
)
async def test_fold_in_with_a_bad_rating_is_invalid(served: Served, rating: float, message: str) -> None:
    interactions = served.interactions(1)[:4]
    interactions[2].rating = rating
    with pytest.raises(InvalidArgument, match=message):
        await _fold_in(served, interactions, k=5)


async def test_fold_in_with_unknown_items_is_not_found_naming_them(served: Served) -> None:
    interactions = [*served.interactions(1)[:3], rec.Interaction(item_id="ghost", rating=3.0)]
    with pytest.raises(NotFound, match=r"1 item\(s\) of the fold-in are not items of model 'mf' .*'ghost'"):
        await _fold_in(served, interactions)
    with pytest.raises(InvalidArgument, match=r"interactions\[0\]\.item_id is empty"):
        await _fold_in(served, [rec.Interaction(rating=3.0)])
    with pytest.raises(InvalidArgument, match=r"FoldIn takes 1 to 64 interactions"):
        await _fold_in(served, [])
    with pytest.raises(InvalidArgument, match=r"FoldIn takes 1 to 64 interactions .* got 65"):
        await _fold_in(served, [rec.Interaction(item_id="i1", rating=3.0)] * 65)
    with pytest.raises(InvalidArgument, match=r"k=51 is out of range"):
        await _fold_in(served, served.interactions(1)[:3], k=51)


async def test_implicit_fold_in_ignores_ratings(served: Served) -> None:
    items = [f"i{item}" for item in served.implicit_truth.seen(4)]
    plain = await _fold_in(served, [rec.Interaction(item_id=i, rating=1.0) for i in items], model="bpr", k=10)
    odd = [
        rec.Interaction(item_id=i, rating=r) for i, r in zip(items, [math.nan, -3.0, 99.0] * 20, strict=False)
    ]
    other = await _fold_in(served, odd, model="bpr", k=10)
    np.testing.assert_array_equal(from_wire(other.vector), from_wire(plain.vector))
    assert [hit.id for hit in other.items] == [hit.id for hit in plain.items]
    assert plain.model.id == "bpr" and not {hit.id for hit in plain.items} & set(items)


async def test_implicit_fold_in_of_a_trained_users_items_recommends_like_that_user(served: Served) -> None:
    overlaps = []
    for user in range(0, 200, 10):
        items = [f"i{item}" for item in served.implicit_truth.seen(user)]
        folded = await _fold_in(served, [rec.Interaction(item_id=i) for i in items], model="bpr", k=10)
        trained = await _recommend(served, f"u{user}", model="bpr")
        overlaps.append(len({hit.id for hit in trained.items} & {hit.id for hit in folded.items}))
    assert np.mean(overlaps) >= 5, overlaps  # measured 7.0 of 10 (4 to 9 per user)


# Encode ------------------------------------------------------------------------------------------------


def _inputs(*values: str) -> list[pb.Input]:
    return [pb.Input(user_id=v[2:]) if v.startswith("u:") else pb.Input(item_id=v[2:]) for v in values]


async def _encode(served: Served, inputs: Sequence[pb.Input], **options: Any) -> enc.EncodeResponse:
    request = enc.EncodeRequest(inputs=inputs, options=pb.EncodeOptions(**options), request_id="r1")
    return await served.worker.encoder.Encode(request, _CONTEXT)


def _vectors(response: enc.EncodeResponse) -> np.ndarray:
    return np.stack([from_wire(embedding.vector) for embedding in response.embeddings])


async def test_encode_returns_the_learnt_vectors_exactly(served: Served) -> None:
    model = served.mf
    response = await _encode(served, _inputs("u:u3", "i:i7", "u:u199", "i:i0"), normalize=False)
    expected = np.stack(
        [
            model.user_vectors[model.user_index["u3"]],
            model.item_vectors[model.item_index["i7"]],
            model.user_vectors[model.user_index["u199"]],
            model.item_vectors[model.item_index["i0"]],
        ]
    )
    np.testing.assert_array_equal(_vectors(response), expected)
    assert response.request_id == "r1" and (response.model.id, response.model.version) == (
        "mf",
        model.version,
    )
    assert response.model.space == "useritem-mf"

    unit = _vectors(await _encode(served, _inputs("u:u3", "i:i7")))  # normalised by default
    np.testing.assert_allclose(
        unit, expected[:2] / np.linalg.norm(expected[:2], axis=1, keepdims=True), rtol=1e-6
    )
    short = _vectors(await _encode(served, _inputs("u:u3", "i:i7"), dimensions=3, normalize=False))
    np.testing.assert_array_equal(short, expected[:2, :3])
    short_unit = _vectors(await _encode(served, _inputs("u:u3"), dimensions=3))
    np.testing.assert_allclose(short_unit[0], expected[0, :3] / np.linalg.norm(expected[0, :3]), rtol=1e-6)
    half = await _encode(served, _inputs("i:i7"), normalize=False, dtype=pb.DTYPE_FLOAT16)
    assert half.embeddings[0].vector.dtype == pb.DTYPE_FLOAT16 and len(half.embeddings[0].vector.data) == 16
    np.testing.assert_allclose(_vectors(half)[0], expected[1], rtol=1e-3, atol=1e-3)

    # another model's vectors by name
    bpr = served.worker.catalog.get("bpr")
    by_name = await served.worker.encoder.Encode(
        enc.EncodeRequest(model="bpr", inputs=_inputs("u:u3"), options=pb.EncodeOptions(normalize=False)),
        _CONTEXT,
    )
    np.testing.assert_array_equal(_vectors(by_name)[0], bpr.user_vectors[bpr.user_index["u3"]])


@pytest.mark.parametrize(
    ("inputs", "error", "message"),
    [
        (_inputs("u:u1", "u:nobody"), NotFound, r"inputs\[1\]\.user_id 'nobody' is not a user of model 'mf'"),
        (_inputs("u:u1", "i:i1", "i:u1"), NotFound, r"inputs\[2\]\.item_id 'u1' is not an item"),
        (
            [pb.Input(text="hello"), *_inputs("u:u1")],
            InvalidArgument,
            r"inputs\[0\] is text; model 'mf' accepts",
        ),
        ([*_inputs("u:u1"), pb.Input(image=b"\x89PNG")], InvalidArgument, r"inputs\[1\] is image"),
        ([*_inputs("u:u1"), pb.Input()], InvalidArgument, r"inputs\[1\] is empty"),
        (_inputs("u:"), InvalidArgument, r"inputs\[0\]\.user_id is empty"),
        ([], InvalidArgument, r"inputs is empty"),
    ],
)
async def test_encode_refuses_bad_inputs_naming_them(
    served: Served, inputs: list[pb.Input], error: type[ServiceError], message: str
) -> None:
    with pytest.raises(error, match=message):
        await _encode(served, inputs)


async def test_encode_refuses_options_the_model_cannot_honour(served: Served) -> None:
    with pytest.raises(
        InvalidArgument, match=r"options\.dimensions=9 exceeds the dimension of model 'mf' \(8\)"
    ):
        await _encode(served, _inputs("u:u1"), dimensions=9)
    with pytest.raises(InvalidArgument, match=r"unknown model 'nope'"):
        await served.worker.encoder.Encode(enc.EncodeRequest(model="nope", inputs=_inputs("u:u1")), _CONTEXT)


async def test_list_models_describes_each_serving_model(served: Served) -> None:
    listed = await served.worker.encoder.ListModels(enc.ListModelsRequest(), _CONTEXT)
    assert [(m.id, m.version, m.dimension, m.space) for m in listed.models] == [
        ("bpr", served.worker.catalog.get("bpr").version, 8, "useritem-bpr"),
        ("mf", served.mf.version, 8, "useritem-mf"),
    ]
    assert list(listed.models[1].input_kinds) == [pb.INPUT_KIND_USER, pb.INPUT_KIND_ITEM]
    assert "implicit feedback (BPR)" in listed.models[0].description
    assert "200 users, 100 items, 6000 interactions" in listed.models[1].description
