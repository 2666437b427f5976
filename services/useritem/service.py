"""The Recommender service: recommendations, scores, similar items, fold-in and Fit over the catalog."""

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import numpy as np
from embeddings.v1 import content_pb2 as cpb
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import recommender_pb2_grpc as rec_grpc
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument, NotFound
from services.common.topk import check_k
from services.common.vectors import to_wire
from services.useritem.catalog import Catalog, item_row, user_row
from services.useritem.cold_items import ColdItems
from services.useritem.fitting import Fitter
from services.useritem.interactions import check_rating
from services.useritem.model import Ranked, TrainedModel
from services.useritem.settings import UserItemSettings

T = TypeVar("T")


def _hits(model: TrainedModel, ranked: Ranked) -> list[pb.Hit]:
    rows, scores = ranked
    return [
        pb.Hit(id=model.items[row], score=float(score), kind=pb.INPUT_KIND_ITEM)
        for row, score in zip(rows.tolist(), scores.tolist(), strict=True)
    ]


def _shown(ids: list[str]) -> str:
    return ", ".join(repr(item) for item in ids[:5]) + (" ..." if len(ids) > 5 else "")


def _known_items(model: TrainedModel, ids: Sequence[str]) -> np.ndarray:
    """Rows of the ids the model knows (others are ignored: they cannot be recommended anyway)."""
    index = model.item_index
    return np.array([index[item] for item in ids if item in index], dtype=np.int64)


class RecommenderService(rec_grpc.RecommenderServicer):
    def __init__(self, catalog: Catalog, fitter: Fitter, settings: UserItemSettings) -> None:
        self._catalog = catalog
        self._fitter = fitter
        self._settings = settings
        self._cold_items = ColdItems(catalog, fitter, settings)
        # Scoring a large catalogue takes milliseconds of numpy (which releases the GIL): off the loop.
        self._serving = ThreadPoolExecutor(2, thread_name_prefix="serve")

    def close(self) -> None:
        self._serving.shutdown(wait=False, cancel_futures=True)

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._serving, function, *args)

    async def Recommend(
        self, request: rec.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> rec.RecommendResponse:
        check_k(request.k, self._settings.max_k, "USERITEM_MAX_K")
        model = self._catalog.get(request.model)
        exclude = _known_items(model, request.exclude_items)
        candidates = _known_items(model, request.candidate_items) if request.candidate_items else None
        if request.fallback_below:
            if not request.user_id:
                raise InvalidArgument("is empty", field="user_id")
            row = model.user_index.get(request.user_id)
            if row is None or len(model.seen(row)) < request.fallback_below:
                seen = None if row is None or request.include_seen else model.seen(row)
                excluded = exclude if seen is None else np.concatenate([exclude, seen])
                ranked = await self._run(model.popular, request.k, excluded, candidates)
                return rec.RecommendResponse(
                    items=_hits(model, ranked), model=model.card.ref(), fallback=True
                )
        else:
            row = user_row(model, request.user_id)
        ranked = await self._run(model.recommend, row, request.k, request.include_seen, exclude, candidates)
        return rec.RecommendResponse(items=_hits(model, ranked), model=model.card.ref())

    async def Score(self, request: rec.ScoreRequest, context: grpc.aio.ServicerContext) -> rec.ScoreResponse:
        limit = self._settings.max_inputs_per_request
        if not request.item_ids or len(request.item_ids) > limit:
            raise InvalidArgument(
                f"Score takes 1 to {limit} item ids (USERITEM_MAX_INPUTS_PER_REQUEST); got {len(request.item_ids)}",
                field="item_ids",
            )
        model = self._catalog.get(request.model)
        row = user_row(model, request.user_id)
        unknown = []
        rows = []
        for index, item in enumerate(request.item_ids):
            if not item:
                raise InvalidArgument("is empty", field=f"item_ids[{index}]")
            found = model.item_index.get(item)
            if found is None:
                unknown.append(item)
            else:
                rows.append(found)
        if unknown:
            raise NotFound(
                f"{len(unknown)} item(s) are not items of model {model.name!r} (version {model.version}): "
                f"{_shown(unknown)}; leave them out"
            )
        columns = np.array(rows, dtype=np.int64)
        scores = await self._run(model.score, row, columns)
        return rec.ScoreResponse(items=_hits(model, (columns, scores)), model=model.card.ref())

    async def SimilarItems(
        self, request: rec.SimilarItemsRequest, context: grpc.aio.ServicerContext
    ) -> rec.RecommendResponse:
        check_k(request.k, self._settings.max_k, "USERITEM_MAX_K")
        model = self._catalog.get(request.model)
        row = item_row(model, request.item_id)
        ranked = await self._run(model.similar_items, row, request.k)
        return rec.RecommendResponse(items=_hits(model, ranked), model=model.card.ref())

    async def FoldIn(
        self, request: rec.FoldInRequest, context: grpc.aio.ServicerContext
    ) -> rec.FoldInResponse:
        limit = self._settings.max_inputs_per_request
        if not request.interactions or len(request.interactions) > limit:
            raise InvalidArgument(
                f"FoldIn takes 1 to {limit} interactions (USERITEM_MAX_INPUTS_PER_REQUEST); "
                f"got {len(request.interactions)}"
            )
        if request.k:
            check_k(request.k, self._settings.max_k, "USERITEM_MAX_K")
        model = self._catalog.get(request.model)
        rows, ratings = self._fold_in_rows(model, request.interactions)
        vector, bias = await self._run(model.fold_in, rows, ratings, self._settings.fold_in_alpha)
        items: list[pb.Hit] = []
        if request.k:
            exclude = None if request.include_seen else rows
            items = _hits(model, await self._run(model.rank, vector, bias, request.k, exclude))
        return rec.FoldInResponse(vector=to_wire(vector), model=model.card.ref(), items=items)

    def _fold_in_rows(
        self, model: TrainedModel, interactions: Sequence[rec.Interaction]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Item rows and ratings of a fold-in, a repeated item counting once (its last rating)."""
        latest: dict[int, float] = {}
        unknown = []
        for index, interaction in enumerate(interactions):
            field = f"interactions[{index}]"
            if not interaction.item_id:
                raise InvalidArgument("is empty", field=f"{field}.item_id")
            row = model.item_index.get(interaction.item_id)
            if row is None:
                unknown.append(interaction.item_id)
                continue
            if not model.implicit:
                check_rating(interaction.rating, model.rating_min, model.rating_max, f"{field}.rating")
            latest.pop(row, None)
            latest[row] = interaction.rating
        if unknown:
            raise NotFound(
                f"{len(unknown)} item(s) of the fold-in are not items of model {model.name!r} "
                f"(version {model.version}): {_shown(unknown)}; leave them out"
            )
        return np.fromiter(latest, dtype=np.int64), np.array(list(latest.values()), dtype=np.float32)

    async def FoldInItems(
        self, request: cpb.FoldInItemsRequest, context: grpc.aio.ServicerContext
    ) -> cpb.FoldInItemsResponse:
        return await self._cold_items.fold_in(request)

    async def Fit(
        self, request_iterator: AsyncIterator[rec.FitRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rec.FitProgress]:
        async for progress in self._fitter.fit(request_iterator):
            yield progress
