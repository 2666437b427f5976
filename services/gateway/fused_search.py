"""Search with `all_spaces`: one query searched in every space where its kind has a model, in parallel, the
ranked lists fused by reciprocal rank (rank_fusion.py).

Each space is searched with its default model for the query's kind (the gateway's default model where it
writes into that space, else the first model that does), through the cache and the index backend, exactly
as a one-space Search with that `space` would be. A space that cannot be searched (its worker or index
unavailable, or past the deadline) is left out: it is named in `missing_spaces` with its error, `partial`
is set, and the other spaces' hits are fused; only when every space fails does the call fail, with the
first space's error. Bad input (a k out of range, an unknown filter kind) fails the whole call. When no
space searched holds any item, the call is FAILED_PRECONDITION: nothing was ever indexed where the query
could find it.
"""

import asyncio
import math
import time
from dataclasses import dataclass

from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import types_pb2 as pb

from services.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from services.common.inputs import check_kinds, kind_name, kind_of
from services.common.model_card import ModelCard
from services.common.topk import check_k
from services.common.vectors import l2_normalize
from services.gateway.choosing import ModelChooser
from services.gateway.encoding import CachingEncoder
from services.gateway.index_backend import IndexBackend, Merged, search_budget
from services.gateway.rank_fusion import RankedList, reciprocal_rank_fusion
from services.gateway.routing import Router
from services.gateway.settings import GatewaySettings

# What leaves one space out of a fused search instead of failing it: the space's backends, not the request.
SPACE_FAILURES = (Unavailable, DeadlineExceeded)


@dataclass
class SpaceHits:
    """One space's search: the model that encoded the query, and its hits (None: nothing stored there)."""

    model: pb.ModelRef
    merged: Merged | None


class SpaceSearcher:
    """An input searched in one space: encoded through the cache by `card`, then the index's top k."""

    def __init__(self, encoder: CachingEncoder, index: IndexBackend) -> None:
        self._encoder = encoder
        self._index = index

    async def search(
        self, card: ModelCard, query: pb.Input, k: int, filter: pb.SearchFilter, deadline: float
    ) -> SpaceHits:
        # The encode keeps a reserve of the deadline, so a slow worker leaves time to report the space.
        encoded = await self._encoder.encode(card, [query], False, search_budget(deadline, math.inf), "input")
        vector = l2_normalize(encoded.matrix())[0]
        return SpaceHits(
            encoded.model, await self._index.search(card.space, vector, k, filter, "input", deadline)
        )


class FusedSearch:
    def __init__(
        self, router: Router, models: ModelChooser, searcher: SpaceSearcher, settings: GatewaySettings
    ) -> None:
        self._router = router
        self._models = models
        self._searcher = searcher
        self._settings = settings

    async def search(self, request: gw.SearchRequest, timeout: float) -> gw.SearchResponse:
        deadline = time.monotonic() + timeout
        check_k(request.k, self._settings.max_k, "GATEWAY_MAX_K")
        check_kinds(request.filter.kinds, "filter.kinds")
        if not request.HasField("input"):
            raise InvalidArgument(
                "all_spaces needs `input`: a vector belongs to one space (search it with `space`, without "
                "all_spaces)"
            )
        if request.space or request.model:
            raise InvalidArgument(
                "all_spaces searches every space with its own model: leave `space` and `model` empty, or "
                "unset all_spaces to search one space"
            )
        kind = kind_of(request.input, 0)
        spaces = sorted(self._router.spaces.get(kind, set()))
        if not spaces:
            self._models.default_card(kind)  # raises: no model for the kind (or its worker is down)
        cards = [self._models.default_card(kind, space) for space in spaces]
        results = await asyncio.gather(
            *(
                self._searcher.search(card, request.input, request.k, request.filter, deadline)
                for card in cards
            ),
            return_exceptions=True,
        )
        for result in results:  # bad input (the same in every space) fails the call; so does a bug
            if isinstance(result, BaseException) and not isinstance(result, SPACE_FAILURES):
                raise result
        found = [(card, result) for card, result in zip(cards, results, strict=True)]
        failed = [result for _, result in found if isinstance(result, BaseException)]
        if len(failed) == len(found):
            raise failed[0]
        answered = [result for _, result in found if isinstance(result, SpaceHits)]
        if not failed and all(result.merged is None for result in answered):
            raise FailedPrecondition(
                f"none of the spaces where {kind_name(kind)} inputs have a model ({', '.join(spaces)}) holds "
                "any item: upsert items into one of them first (a search of one space answers no hits)"
            )
        lists = [
            RankedList(result.model, result.merged.hits) for result in answered if result.merged is not None
        ]
        missing_shards = sorted(
            {shard for result in answered if result.merged is not None for shard in result.merged.missing}
        )
        missing_spaces = [card.space for card, result in found if isinstance(result, BaseException)]
        return gw.SearchResponse(
            hits=reciprocal_rank_fusion(lists, self._settings.fusion_rrf_k, request.k),
            partial=bool(missing_shards or missing_spaces),
            missing_shards=missing_shards,
            spaces=[_searched(card, result) for card, result in found],
            missing_spaces=missing_spaces,
        )


def _searched(card: ModelCard, result: SpaceHits | BaseException) -> gw.SpaceSearched:
    if isinstance(result, BaseException):
        return gw.SpaceSearched(model=card.ref(), error=str(result))
    if result.merged is None:
        return gw.SpaceSearched(model=result.model, empty=True)
    return gw.SpaceSearched(
        model=result.model, hits=len(result.merged.hits), missing_shards=result.merged.missing
    )
