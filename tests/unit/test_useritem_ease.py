"""EASE and the ranking options: planted tastes recovered far better than popularity, the closed form,
Score agreeing with Recommend, predictions inside the declared scale, Recommend's exclude / candidates /
popularity fallback, FoldIn, and the Fit's per-request kind and hyper-parameters."""

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from embeddings.v1 import recommender_pb2 as rec

from services.common.errors import InvalidArgument, NotFound
from services.useritem.ease import EaseConfig, item_weights, train_ease
from services.useritem.interactions import Dataset, InteractionBuffer
from services.useritem.model import EASE, MF, TrainedModel
from services.useritem.ranking import ranking_figures
from services.useritem.training import FitCancelled, split
from tests.unit.test_useritem_fitting import _fit_thread_idle, _Held, _restarted, _state
from tests.unit.test_useritem_service import _CONTEXT, Worker, _fit, _messages, _worker
from tests.unit.useritem_data import Planted, planted, rules


def tastes(users: int = 400, items: int = 120, groups: int = 6, per_user: int = 24, seed: int = 3) -> Dataset:
    """Users of `groups` tastes, each liking its own sixth of the items, and items of skewed popularity
    that everybody sees: popularity alone finds the popular items, not a user's taste."""
    rng = np.random.default_rng(seed)
    popularity = rng.standard_normal(items)
    taste = rng.integers(groups, size=users)
    group_of_item = np.arange(items) % groups
    buffer = InteractionBuffer(rules(implicit=True))
    interactions = []
    for user in range(users):
        logits = popularity + 3.0 * (group_of_item == taste[user])
        weights = np.exp(logits - logits.max())
        chosen = rng.choice(items, per_user, replace=False, p=weights / weights.sum())
        interactions += [
            rec.Interaction(user_id=f"u{user}", item_id=f"i{item}", rating=1.0) for item in chosen
        ]
    buffer.add(interactions)
    return buffer.dataset()


def _popularity_figures(data: Dataset, fraction: float, seed: int) -> tuple[float, float]:
    train_rows, valid_rows = split(data, fraction, seed)
    counts = np.bincount(data.item_rows[train_rows], minlength=len(data.items)).astype(np.float32)
    figures = ranking_figures(
        lambda users: np.tile(counts, (len(users), 1)),
        data.user_rows,
        data.item_rows,
        train_rows,
        valid_rows,
        len(data.users),
        len(data.items),
    )
    return figures.recall_at_10, figures.ndcg_at_10


def test_ease_recovers_planted_tastes_far_better_than_popularity() -> None:
    data = tastes()
    config = EaseConfig(l2=50.0, validation_fraction=0.2, seed=0)
    reports: list[object] = []
    matrix, _, metrics = train_ease(data, config, True, (0.5, 5.0), reports.append, threading.Event())
    recall, ndcg = _popularity_figures(data, 0.2, 0)
    # measured: EASE recall@10 0.61, NDCG@10 0.61; popularity 0.26 and 0.24
    assert metrics.validation_recall_at_10 > 2 * recall, (metrics, recall)
    assert metrics.validation_ndcg_at_10 > 2 * ndcg, (metrics, ndcg)
    assert len(reports) == 1 and metrics.epochs == 1
    assert matrix.shape == (120, 120) and matrix.dtype == np.float32 and matrix.flags.c_contiguous


def test_ease_weights_are_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    users, items = 60, 25
    dense = (rng.random((users, items)) < 0.3) * rng.integers(1, 6, size=(users, items))
    user_rows, item_rows = np.nonzero(dense)
    weights = dense[user_rows, item_rows].astype(np.float32)
    l2 = 2.0
    got = item_weights(user_rows, item_rows, weights, (users, items), l2, threading.Event())
    penalty = l2 * np.mean(weights.astype(np.float64) ** 2)
    inverse = np.linalg.inv(dense.T.astype(np.float64) @ dense + penalty * np.eye(items))
    expected = -inverse / np.diag(inverse)[None, :]
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
    assert not np.diag(got).any()


# Through the service ---------------------------------------------------------------------------------


@dataclass
class Served:
    worker: Worker
    truth: Planted

    @property
    def ease(self) -> TrainedModel:
        return self.worker.catalog.get("ease")

    @property
    def mf(self) -> TrainedModel:
        return self.worker.catalog.get("mf")


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    """An EASE model (the worker's default kind) and an explicit MF model of the same ratings."""
    worker = _worker(tmp_path_factory.mktemp("ease"), default_kind="ease")
    truth = planted(seed=7)
    progress = await _fit(worker, _messages(truth, model="ease"))
    assert progress[-1].kind == rec.MODEL_KIND_EASE
    await _fit(worker, _messages(truth, model="mf", kind=rec.MODEL_KIND_MF))
    yield Served(worker, truth)
    worker.close()


async def _recommend(
    served: Served, user: str, model: str, k: int = 10, **fields: object
) -> rec.RecommendResponse:
    request = rec.RecommendRequest(user_id=user, k=k, model=model, **fields)  # type: ignore[arg-type]
    return await served.worker.service.Recommend(request, _CONTEXT)


async def _score(served: Served, user: str, items: list[str], model: str) -> rec.ScoreResponse:
    request = rec.ScoreRequest(user_id=user, item_ids=items, model=model)
    return await served.worker.service.Score(request, _CONTEXT)


async def test_the_default_kind_fits_ease_with_validation_figures(served: Served) -> None:
    model = served.ease
    assert model.kind == EASE and served.mf.kind == MF
    assert 0 < model.metrics.validation_recall_at_10 <= 1 and 0 < model.metrics.validation_ndcg_at_10 <= 1
    assert model.item_weights is not None and model.item_weights.shape == (100, 100)
    assert served.worker.store.load_all()["ease"].version == model.version  # saved and loaded intact


@pytest.mark.parametrize("name", ["ease", "mf"])
async def test_score_agrees_with_recommend(served: Served, name: str) -> None:
    for user in ("u0", "u17", "u199"):
        hits = (await _recommend(served, user, name)).items
        scored = await _score(served, user, [hit.id for hit in hits], name)
        assert [hit.id for hit in scored.items] == [hit.id for hit in hits]
        np.testing.assert_allclose(
            [h.score for h in scored.items], [h.score for h in hits], rtol=1e-5, atol=1e-5
        )


async def test_explicit_predictions_stay_inside_the_declared_scale(served: Served) -> None:
    model = served.mf
    items = [f"i{item}" for item in range(64)]
    raw_outside = 0
    for user in range(0, 200, 7):
        scores = [hit.score for hit in (await _score(served, f"u{user}", items, "mf")).items]
        assert all(model.rating_min <= score <= model.rating_max for score in scores)
        vector, bias = model.user_vector(user)
        raw = model.scores(vector, bias)
        raw_outside += int(((raw < model.rating_min) | (raw > model.rating_max)).sum())
        hits = (await _recommend(served, f"u{user}", "mf", k=50, include_seen=True)).items
        assert all(model.rating_min <= hit.score <= model.rating_max for hit in hits)
    assert raw_outside > 0  # the clamp had something to do


async def test_ease_scores_are_the_history_times_b(served: Served) -> None:
    model = served.ease
    assert model.item_weights is not None and model.seen_weights is not None
    row = model.user_index["u5"]
    history = np.zeros(100, dtype=np.float64)
    span = slice(model.seen_offsets[row], model.seen_offsets[row + 1])
    history[model.seen_items[span]] = model.seen_weights[span]
    expected = history @ model.item_weights.astype(np.float64)
    hits = (await _recommend(served, "u5", "ease")).items
    got = [hit.score for hit in hits]
    np.testing.assert_allclose(
        got, [expected[model.item_index[hit.id]] for hit in hits], rtol=1e-4, atol=1e-5
    )
    expected[model.seen(row)] = -np.inf
    assert {hit.id for hit in hits} == {model.items[i] for i in np.argsort(-expected)[:10]}


async def test_fold_in_of_a_users_own_ratings_recommends_what_recommend_does(served: Served) -> None:
    for name in ("ease", "mf"):
        model = served.worker.catalog.get(name)
        interactions = [i for i in served.truth.interactions() if i.user_id == "u3"]
        request = rec.FoldInRequest(interactions=interactions, model=name, k=10)
        folded = await served.worker.service.FoldIn(request, _CONTEXT)
        assert len(folded.vector.data) == 4 * model.factors
        recommended = await _recommend(served, "u3", name)
        if name == "ease":  # the same history row: the same answer
            assert [h.id for h in folded.items] == [h.id for h in recommended.items]
        else:  # least squares against fixed item vectors: close to the trained user's list
            assert len({h.id for h in folded.items} & {h.id for h in recommended.items}) >= 5


async def test_recommend_excludes_items_and_keeps_to_candidates(served: Served) -> None:
    for name in ("ease", "mf"):
        first = [hit.id for hit in (await _recommend(served, "u9", name)).items]
        excluded = await _recommend(served, "u9", name, exclude_items=[*first[:3], "no-such-item"])
        assert not set(first[:3]) & {hit.id for hit in excluded.items}
        assert [hit.id for hit in excluded.items][:7] == first[3:]
        candidates = [f"i{item}" for item in range(0, 100, 3)]
        kept = await _recommend(served, "u9", name, k=50, candidate_items=candidates, exclude_items=["i0"])
        seen = {f"i{item}" for item in served.truth.seen(9)}
        assert {hit.id for hit in kept.items} == set(candidates) - seen - {"i0"}
        assert not kept.fallback


async def test_popularity_fallback_is_flagged_and_only_for_little_history(served: Served) -> None:
    model = served.ease
    unknown = await _recommend(served, "nobody", "ease", fallback_below=1)
    assert unknown.fallback
    counts = model.item_counts
    # the most interacted-with items (ties in any order), each scored by its count
    assert all(hit.score == counts[model.item_index[hit.id]] for hit in unknown.items)
    assert [hit.score for hit in unknown.items] == sorted((float(c) for c in counts), reverse=True)[:10]
    # u0 has 30 interactions: a fallback below 31 applies (seen items still excluded), below 30 does not
    little = await _recommend(served, "u0", "ease", fallback_below=31)
    assert little.fallback and not {f"i{i}" for i in served.truth.seen(0)} & {h.id for h in little.items}
    enough = await _recommend(served, "u0", "ease", fallback_below=30)
    assert not enough.fallback
    with pytest.raises(NotFound):
        await _recommend(served, "nobody", "ease")


async def test_score_refuses_unknown_users_and_items_and_bad_sizes(served: Served) -> None:
    with pytest.raises(NotFound, match="nobody"):
        await _score(served, "nobody", ["i1"], "ease")
    with pytest.raises(NotFound, match="'i-missing'"):
        await _score(served, "u1", ["i1", "i-missing"], "ease")
    with pytest.raises(InvalidArgument, match="USERITEM_MAX_INPUTS_PER_REQUEST"):
        await _score(served, "u1", [], "ease")
    with pytest.raises(InvalidArgument, match="USERITEM_MAX_INPUTS_PER_REQUEST"):
        await _score(served, "u1", ["i1"] * 65, "ease")


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    fresh = _worker(tmp_path, default_kind="ease", ease_max_items=50)
    yield fresh
    fresh.close()


async def test_ease_refuses_more_items_than_its_limit_and_changes_nothing(worker: Worker) -> None:
    with pytest.raises(InvalidArgument, match="USERITEM_EASE_MAX_ITEMS"):
        await _fit(worker, _messages(planted(seed=7)))
    assert worker.catalog.models == [] and worker.versions() == set()
    # MF has no such limit
    await _fit(worker, _messages(planted(seed=7), kind=rec.MODEL_KIND_MF))
    assert worker.catalog.get("").kind == MF


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        (rec.FitParameters(l2=0.0), "parameters.l2"),
        (rec.FitParameters(l2=float("nan")), "parameters.l2"),
        (rec.FitParameters(factors=9), "parameters.factors"),
        (rec.FitParameters(epochs=0), "parameters.epochs"),
        (rec.FitParameters(learning_rate=2.0), "parameters.learning_rate"),
        (rec.FitParameters(validation_fraction=0.5), "parameters.validation_fraction"),
    ],
)
async def test_out_of_range_parameters_are_refused(
    worker: Worker, parameters: rec.FitParameters, field: str
) -> None:
    truth = planted(users=20, items=10, per_user=5)
    with pytest.raises(InvalidArgument) as caught:
        await _fit(worker, _messages(truth, parameters=parameters))
    assert caught.value.field == field
    assert worker.catalog.models == []


async def test_per_fit_parameters_replace_the_workers_settings(worker: Worker) -> None:
    truth = planted(seed=7)
    parameters = rec.FitParameters(epochs=2, factors=4, patience=5, validation_fraction=0.0)
    progress = await _fit(worker, _messages(truth, kind=rec.MODEL_KIND_MF, parameters=parameters))
    assert [p.epoch for p in progress[:-1]] == [1, 2] and progress[-1].epochs == 2
    model = worker.catalog.get("")
    assert model.factors == 4 and model.metrics.validation_recall_at_10 == 0.0


async def test_mf_epochs_report_ranking_figures_and_implicit_fits_keep_the_best_ndcg(worker: Worker) -> None:
    truth = planted(implicit=True, seed=8)
    progress = await _fit(worker, _messages(truth, kind=rec.MODEL_KIND_MF, implicit=True))
    *epochs, done = progress
    assert epochs and all(p.validation_recall_at_10 > 0 and p.validation_ndcg_at_10 > 0 for p in epochs)
    assert all(p.kind == rec.MODEL_KIND_MF for p in progress)
    assert done.validation_ndcg_at_10 == max(p.validation_ndcg_at_10 for p in epochs)
    assert done.epoch == next(
        p.epoch for p in epochs if p.validation_ndcg_at_10 == done.validation_ndcg_at_10
    )


def test_a_cancelled_ease_solve_stops_with_fit_cancelled() -> None:
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(FitCancelled):
        train_ease(tastes(), EaseConfig(50.0, 0.2, 0), True, (0.5, 5.0), lambda _: None, cancelled)


@pytest.mark.parametrize("before", [True, False], ids=["before the write", "after the write"])
async def test_an_ease_fit_whose_caller_leaves_before_promotion_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: bool
) -> None:
    fresh = _worker(tmp_path, default_kind="ease")
    try:
        await _fit(fresh, _messages(planted(seed=7)))
        serving = _state(fresh)
        held = _Held(monkeypatch, "stage", before)
        task = asyncio.create_task(_fit(fresh, _messages(planted(seed=8))))
        await held.wait_reached()
        await held.leave(task)
        await _fit_thread_idle(fresh)
        assert _state(fresh) == serving and _restarted(fresh) == serving["serving"]
        assert fresh.catalog.get("").kind == EASE
    finally:
        fresh.close()
