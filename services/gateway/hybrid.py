"""HybridSearch: "more like what user 42 likes, but red shoes". A text or image query finds the candidates
in a content space (its nearest `candidates` items, as a one-space Search would); a user-item model ranks the
same candidates by the user's taste; the two ranked lists are mixed (rank_fusion.py) with the request's
weight.

Items are tied to the user-item model by id: the item indexed as "i7" in the content space is the
user-item model's item "i7". The user's score of a candidate is the dot product of the user's and the
item's learnt vectors (both from the user-item worker's Encode, through the gateway's cache): the model's
personal term, without the item biases, which rank popularity rather than taste. A candidate the model does
not know (an item with content but no interactions yet) has no user score: it gets no user term in the RRF
mix and 0 in the weighted one. The items the user interacted with are not left out: this is a search.
"""

import asyncio
import math
import re
import time

import numpy as np
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.inputs import check_kinds
from services.common.model_card import ModelCard
from services.common.topk import check_k
from services.gateway.choosing import ModelChooser
from services.gateway.encoding import CachingEncoder, Encoded
from services.gateway.fused_search import SpaceSearcher
from services.gateway.index_backend import search_budget
from services.gateway.rank_fusion import RankedList, reciprocal_rank_fusion, weighted_scores
from services.gateway.settings import GatewaySettings

DEFAULT_USER_WEIGHT = 0.5
_ITEM_FIELD = re.compile(r"inputs\[(\d+)\]\.item_id")


class HybridSearch:
    def __init__(
        self,
        models: ModelChooser,
        encoder: CachingEncoder,
        searcher: SpaceSearcher,
        settings: GatewaySettings,
    ) -> None:
        self._models = models
        self._encoder = encoder
        self._searcher = searcher
        self._settings = settings

    async def search(self, request: gw.HybridSearchRequest, timeout: float) -> gw.SearchResponse:
        deadline = time.monotonic() + timeout
        max_k = self._settings.max_k
        check_k(request.k, max_k, "GATEWAY_MAX_K")
        check_kinds(request.filter.kinds, "filter.kinds")
        weight = request.user_weight if request.HasField("user_weight") else DEFAULT_USER_WEIGHT
        if not 0.0 <= weight <= 1.0:  # NaN too
            raise InvalidArgument(
                f"is {weight}; it must be in [0, 1] (0: the query alone, 1: the user alone)",
                field="user_weight",
            )
        if request.mix not in gw.HybridMix.values():
            raise InvalidArgument(f"is {request.mix}, not a HybridMix (RRF = 0, WEIGHTED = 1)", field="mix")
        depth = request.candidates or max(self._settings.hybrid_candidates, request.k)
        if not request.k <= depth <= max_k:
            raise InvalidArgument(
                f"is {request.candidates}; it must be at least k ({request.k}) and at most {max_k} "
                "(GATEWAY_MAX_K), or 0 for GATEWAY_HYBRID_CANDIDATES",
                field="candidates",
            )
        if not request.HasField("input"):
            raise InvalidArgument("is empty: give the text or image to search for", field="input")
        if not request.user_id:
            raise InvalidArgument("is empty: name the user whose taste mixes in", field="user_id")
        user = pb.Input(user_id=request.user_id)
        useritem = self._models.card_for(request.useritem_model, [user], "useritem_model")
        content = self._models.card_for(request.model, [request.input], "input", request.space)

        found, (user_vector, user_model) = await asyncio.gather(
            self._searcher.search(content, request.input, depth, request.filter, deadline),
            self._user_vector(useritem, user, deadline),
        )
        hits = found.merged.hits if found.merged is not None else []
        items, versions = await self._item_vectors(useritem, [hit.id for hit in hits], deadline)
        if versions - {user_model.version}:
            raise Unavailable(
                f"user-item model {useritem.id!r} changed version during the call (a Fit was promoted); retry"
            )
        by_taste = sorted(
            (
                pb.Hit(
                    id=hit.id,
                    score=float(items[hit.id] @ user_vector),
                    kind=hit.kind,
                    payload_json=hit.payload_json,
                    shard=hit.shard,
                )
                for hit in hits
                if hit.id in items
            ),
            key=lambda hit: -hit.score,
        )
        lists = [RankedList(found.model, hits, 1.0 - weight), RankedList(user_model, by_taste, weight)]
        fused = (
            weighted_scores(lists, request.k)
            if request.mix == gw.HYBRID_MIX_WEIGHTED
            else reciprocal_rank_fusion(lists, self._settings.fusion_rrf_k, request.k)
        )
        missing = found.merged.missing if found.merged is not None else []
        return gw.SearchResponse(
            hits=fused,
            space=content.space,
            partial=bool(missing),
            missing_shards=missing,
            query_model=found.model,
            spaces=[
                gw.SpaceSearched(
                    model=found.model, hits=len(hits), missing_shards=missing, empty=found.merged is None
                ),
                gw.SpaceSearched(model=user_model, hits=len(by_taste)),
            ],
        )

    async def _user_vector(
        self, card: ModelCard, user: pb.Input, deadline: float
    ) -> tuple[np.ndarray, pb.ModelRef]:
        """The user's learnt vector, and the model version it comes from."""
        try:
            encoded = await self._encoder.encode(card, [user], False, search_budget(deadline, math.inf))
        except NotFound as error:  # the worker names inputs[0].user_id: the caller sent `user_id`
            raise NotFound(error.description, field="user_id") from None
        return encoded.matrix()[0], encoded.model

    async def _item_vectors(
        self, card: ModelCard, ids: list[str], deadline: float
    ) -> tuple[dict[str, np.ndarray], set[str]]:
        """The learnt vectors of the ids the model knows, and the model versions they come from. One call
        for all of them; when the model lacks some (the worker names the first it lacks), one call per id,
        the ids it lacks left out."""
        if not ids:
            return {}, set()
        inputs = [pb.Input(item_id=item_id) for item_id in ids]
        try:
            encoded = await self._encoder.encode(card, inputs, False, search_budget(deadline, math.inf))
            return dict(zip(ids, encoded.matrix(), strict=True)), {encoded.model.version}
        except NotFound as error:
            if not _ITEM_FIELD.fullmatch(error.field):
                raise
        budget = search_budget(deadline, math.inf)

        async def one(item: pb.Input) -> Encoded | None:
            try:
                return await self._encoder.encode(card, [item], False, budget)
            except NotFound as error:
                if _ITEM_FIELD.fullmatch(error.field):
                    return None
                raise

        answers = await asyncio.gather(*(one(item) for item in inputs))
        known = {item_id: answer for item_id, answer in zip(ids, answers, strict=True) if answer is not None}
        vectors = {item_id: answer.matrix()[0] for item_id, answer in known.items()}
        return vectors, {answer.model.version for answer in known.values()}
