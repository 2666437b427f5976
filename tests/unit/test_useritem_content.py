"""Cold-start items in the user-item worker: the content map (ridge regression, its leave-one-out penalty
choice), learnt at Fit from item content and saved with the version; FoldInItems gives items held out of
the Fit vectors from their content that rank users as the planted truth does, in a new saved version;
and the bad requests, each with its status."""

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from embeddings.v1 import content_pb2 as cpb
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb

from services.common.errors import ServiceError
from services.common.vectors import from_wire, to_wire
from services.useritem.content_map import learn_content_map
from services.useritem.settings import UserItemSettings
from services.useritem.store import ModelStore, load
from tests.unit.test_useritem_service import _CONTEXT, Worker, _fit, _worker
from tests.unit.useritem_data import Planted, one_torch_thread, planted

SPACE = "content-test"
CONTENT_DIM = 24
HELD_OUT = 10  # the last items: never in a Fit's interactions


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


# The map ------------------------------------------------------------------------------------------------


def test_a_noiseless_linear_map_is_recovered() -> None:
    rng = np.random.default_rng(0)
    content = rng.standard_normal((300, 12))
    unit = content / np.linalg.norm(content, axis=1, keepdims=True)
    truth = rng.standard_normal((12, 5))
    targets = unit @ truth + np.array([1.0, -2.0, 0.0, 0.5, 3.0])
    learnt = learn_content_map("s", content * 7.0, targets)  # scale is normalised away
    assert learnt.l2 == 0.01  # the smallest penalty of the grid: nothing to shrink against
    assert learnt.r2 > 0.99
    assert np.allclose(learnt.apply(content[:20]), targets[:20], atol=0.05)
    assert learnt.dimension == 12 and learnt.items == 300 and learnt.space == "s"


def test_the_penalty_is_the_one_of_least_leave_one_out_error_computed_by_brute_force() -> None:
    rng = np.random.default_rng(1)
    content = rng.standard_normal((40, 30))
    targets = content[:, :2] @ rng.standard_normal((2, 3)) + rng.standard_normal((40, 3))
    grid = (0.1, 1.0, 10.0, 100.0)

    def brute_force(l2: float) -> float:
        unit = content / np.linalg.norm(content, axis=1, keepdims=True)
        error = 0.0
        for left in range(len(unit)):
            keep = np.arange(len(unit)) != left
            x, y = unit[keep], targets[keep]
            xm, ym = x.mean(axis=0), y.mean(axis=0)
            w = np.linalg.solve((x - xm).T @ (x - xm) + l2 * np.eye(30), (x - xm).T @ (y - ym))
            error += float((((unit[left] - xm) @ w + ym - targets[left]) ** 2).sum())
        return error

    errors = {l2: brute_force(l2) for l2 in grid}
    learnt = learn_content_map("s", content, targets, grid)
    assert learnt.l2 == min(errors, key=lambda l2: errors[l2])
    total = float(((targets - targets.mean(axis=0)) ** 2).sum())
    assert learnt.r2 == pytest.approx(1.0 - errors[learnt.l2] / total, rel=1e-6)
    assert learnt.l2 > 0.1  # 30 dimensions of noise, 40 items: it must shrink


# The worker ---------------------------------------------------------------------------------------------


def _content_worker(root: Path, **overrides: Any) -> Worker:
    """A worker as test_useritem_service makes one, with the settings' own largest k and no fit folder
    unless a test names one."""
    return _worker(
        root, **{"fit_dir": "", "max_k": UserItemSettings.model_fields["max_k"].default, **overrides}
    )


async def _fold_in(worker: Worker, items: list[cpb.ItemContent], **fields: Any) -> cpb.FoldInItemsResponse:
    request = cpb.FoldInItemsRequest(items=items, content_space=fields.pop("content_space", SPACE), **fields)
    return await worker.service.FoldInItems(request, _CONTEXT)


def _content_of(truth: Planted) -> np.ndarray:
    """Each item's content: its planted factors and bias through a fixed linear map, plus noise."""
    rng = np.random.default_rng(11)
    known = np.hstack([truth.item_factors, truth.item_bias[:, None]])
    return known @ rng.standard_normal((known.shape[1], CONTENT_DIM)) + 0.1 * rng.standard_normal(
        (len(known), CONTENT_DIM)
    )


def _item_content(truth: Planted, rows: Sequence[int], dim: int = CONTENT_DIM) -> list[cpb.ItemContent]:
    content = _content_of(truth)
    return [
        cpb.ItemContent(item_id=f"i{row}", vector=to_wire(content[row, :dim].astype(np.float32)))
        for row in rows
    ]


def _messages(truth: Planted, **first: Any) -> list[rec.FitRequest]:
    """The interactions of every item but the held-out ones, and the content of every item (that of the
    held-out ones is ignored: they have no interactions to learn from)."""
    items = truth.affinity.shape[1]
    kept = [i for i in truth.interactions() if int(i.item_id[1:]) < items - HELD_OUT]
    content = _item_content(truth, range(items))
    return [
        rec.FitRequest(interactions=kept[:3000], item_content=content[:50], content_space=SPACE, **first),
        rec.FitRequest(interactions=kept[3000:], item_content=content[50:]),
    ]


@pytest.fixture(scope="module")
def truth() -> Planted:
    return planted(seed=7)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    fresh = _content_worker(tmp_path)
    yield fresh
    fresh.close()


async def test_a_fit_with_content_learns_a_map_that_finds_the_users_of_items_it_never_saw(
    worker: Worker, truth: Planted
) -> None:
    items = truth.affinity.shape[1]
    done = (await _fit(worker, _messages(truth)))[-1]
    assert done.content_map.space == SPACE and done.content_map.dimension == CONTENT_DIM
    assert done.content_map.items == items - HELD_OUT  # those with both content and interactions
    assert done.content_map.r2 > 0.5
    fitted = worker.catalog.get("")
    assert fitted.content_map is not None and f"i{items - 1}" not in fitted.item_index

    held = list(range(items - HELD_OUT, items))
    response = await _fold_in(worker, _item_content(truth, held))
    assert response.added == HELD_OUT and response.model.version != done.model.version
    model = worker.catalog.get("")
    assert model.version == response.model.version and len(model.items) == items
    # Each folded-in item ranks the users as the planted affinity does (a map that learnt nothing: ~0).
    correlations = []
    for row, vector in zip(held, response.vectors, strict=True):
        scores = await worker.service.Score(
            rec.ScoreRequest(user_id="u0", item_ids=[f"i{row}"]), _CONTEXT
        )  # the item is served
        assert scores.items[0].id == f"i{row}"
        item_vector = from_wire(vector)
        by_model = model.user_vectors @ item_vector
        correlations.append(np.corrcoef(by_model, truth.affinity[:, row])[0, 1])
    assert np.median(correlations) > 0.6, correlations
    # saved like a Fit's version: a restarted worker serves it, map and items included
    reloaded = ModelStore(worker.settings.data_dir, 3).load_all()["mf"]
    assert reloaded.version == model.version and reloaded.content_map is not None
    assert reloaded.items == model.items

    # folding an item in again replaces its vector; the next Fit replaces the version whole
    again = await _fold_in(worker, _item_content(truth, [items - 1, items - 2])[::-1])
    assert again.added == 0 and len(worker.catalog.get("").items) == items
    await _fit(worker, _messages(truth))
    assert f"i{items - 1}" not in worker.catalog.get("").item_index


async def _status(call: Any) -> ServiceError:
    with pytest.raises(ServiceError) as raised:
        await call
    return raised.value


async def test_fold_in_items_refuses_what_the_map_cannot_take(worker: Worker, truth: Planted) -> None:
    items = truth.affinity.shape[1]
    await _fit(worker, _messages(truth))
    new = _item_content(truth, [items - 1])
    other_space = await _status(_fold_in(worker, new, content_space="another-space"))
    assert other_space.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "'another-space'" in other_space.message and repr(SPACE) in other_space.message
    no_space = await _status(_fold_in(worker, new, content_space=""))
    assert no_space.code == grpc.StatusCode.INVALID_ARGUMENT and no_space.field == "content_space"
    short = await _status(_fold_in(worker, _item_content(truth, [items - 1], dim=CONTENT_DIM - 1)))
    assert short.code == grpc.StatusCode.INVALID_ARGUMENT and short.field == "items[0].vector"
    learnt = await _status(_fold_in(worker, _item_content(truth, [items - 1, 0])))
    assert learnt.code == grpc.StatusCode.ALREADY_EXISTS and learnt.field == "items[1].item_id"
    inputs = cpb.ItemContent(item_id="new", inputs=[pb.Input(text="a film")])
    encoded_here = await _status(_fold_in(worker, [inputs]))
    assert encoded_here.code == grpc.StatusCode.INVALID_ARGUMENT and encoded_here.field == "items[0].inputs"
    zeros = cpb.ItemContent(item_id="new", vector=to_wire(np.zeros(CONTENT_DIM, dtype=np.float32)))
    assert (await _status(_fold_in(worker, [zeros]))).field == "items[0].vector"
    assert (await _status(_fold_in(worker, []))).code == grpc.StatusCode.INVALID_ARGUMENT
    unknown_model = await _status(_fold_in(worker, new, model="nothing-here"))
    assert unknown_model.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(worker.catalog.get("").items) == items - HELD_OUT  # nothing was added


async def test_a_model_without_a_map_and_an_ease_fit_with_content_are_refused(
    worker: Worker, truth: Planted
) -> None:
    plain = [rec.FitRequest(interactions=list(truth.interactions()))]
    await _fit(worker, plain)
    no_map = await _status(_fold_in(worker, _item_content(truth, [0])))
    assert no_map.code == grpc.StatusCode.FAILED_PRECONDITION and "no content map" in no_map.message
    ease = await _status(_fit(worker, _messages(truth, kind=rec.MODEL_KIND_EASE, model="ease")))
    assert ease.code == grpc.StatusCode.INVALID_ARGUMENT and ease.field == "item_content"
    changed = _messages(truth)
    changed[1].content_space = "another-space"
    assert (await _status(_fit(worker, changed))).field == "content_space"


async def test_fold_in_items_is_refused_while_a_fit_runs(worker: Worker, truth: Planted) -> None:
    await _fit(worker, _messages(truth))
    started, gate = asyncio.Event(), asyncio.Event()

    async def stalled() -> AsyncIterator[rec.FitRequest]:
        started.set()  # asked for its first message: the Fit holds the worker's Fit slot
        yield _messages(truth)[0]
        await gate.wait()

    running = asyncio.ensure_future(_drain(worker.service.Fit(stalled(), _CONTEXT)))
    await started.wait()
    busy = await _status(_fold_in(worker, _item_content(truth, [truth.affinity.shape[1] - 1])))
    assert busy.code == grpc.StatusCode.ABORTED and "a Fit is running" in busy.message
    running.cancel()
    gate.set()
    await asyncio.gather(running, return_exceptions=True)


async def _drain(progress: AsyncIterator[rec.FitProgress]) -> None:
    async for _ in progress:
        pass


def test_a_damaged_content_map_file_fails_its_checksum(tmp_path: Path, truth: Planted) -> None:
    worker = _content_worker(tmp_path)
    try:
        asyncio.run(_fit(worker, _messages(truth)))
    finally:
        worker.close()
    folder = next(path for path in (tmp_path / "models" / "mf").iterdir() if path.is_dir())
    assert load(folder).content_map is not None
    weights = folder / "content_weights.npy"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"content_weights\.npy"):
        load(folder)


async def test_a_fit_from_a_file_takes_its_item_content_in_messages_after_the_first(
    tmp_path: Path, truth: Planted
) -> None:
    (tmp_path / "fit").mkdir()
    worker = _content_worker(tmp_path, fit_dir=str(tmp_path / "fit"))
    try:
        items = truth.affinity.shape[1]
        kept = [i for i in truth.interactions() if int(i.item_id[1:]) < items - HELD_OUT]
        rows = [f"{i.user_id},{i.item_id},{i.rating}" for i in kept]
        (tmp_path / "fit" / "ratings.csv").write_text("user_id,item_id,rating\n" + "\n".join(rows) + "\n")
        content = _item_content(truth, range(items))
        done = (
            await _fit(
                worker,
                [
                    rec.FitRequest(path="ratings.csv", content_space=SPACE, item_content=content[:30]),
                    rec.FitRequest(item_content=content[30:]),
                ],
            )
        )[-1]
        assert done.content_map.items == items - HELD_OUT and done.content_map.space == SPACE
        more = await _status(
            _fit(worker, [rec.FitRequest(path="ratings.csv"), rec.FitRequest(interactions=kept[:1])])
        )
        assert more.code == grpc.StatusCode.INVALID_ARGUMENT and "takes one message" in more.message
    finally:
        worker.close()
