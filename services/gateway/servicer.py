"""The public Gateway service: each method hands its call, with the time it may take, to the part that
serves it (wiring.py builds them)."""

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from embeddings.v1 import content_pb2 as cpb
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import gateway_pb2_grpc as gw_grpc
from embeddings.v1 import recommender_pb2 as rec

from services.common.streaming import ordered_pipeline
from services.gateway.cold_start import ColdStart
from services.gateway.encoding import Encoding
from services.gateway.fused_search import FusedSearch
from services.gateway.hybrid import HybridSearch
from services.gateway.indexing import Indexer
from services.gateway.recommending import Recommendations
from services.gateway.routing import Router
from services.gateway.settings import GatewaySettings
from services.gateway.similarity import Similarities

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class GatewayService(gw_grpc.GatewayServicer):
    def __init__(
        self,
        router: Router,
        encoding: Encoding,
        similarities: Similarities,
        indexer: Indexer,
        fused: FusedSearch,
        hybrid: HybridSearch,
        recommendations: Recommendations,
        cold_start: ColdStart,
        settings: GatewaySettings,
    ) -> None:
        self._router = router
        self._encoding = encoding
        self._similarities = similarities
        self._indexer = indexer
        self._fused = fused
        self._hybrid = hybrid
        self._recommendations = recommendations
        self._cold_start = cold_start
        self._settings = settings

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        """The caller's deadline governs every hop; GATEWAY_WORKER_TIMEOUT_S only when it set none."""
        remaining = context.time_remaining()
        return self._settings.worker_timeout_s if remaining is None else remaining

    def _streamed(
        self,
        requests: AsyncIterator[Req],
        context: grpc.aio.ServicerContext,
        handle: Callable[[Req, float], Awaitable[Resp]],
    ) -> AsyncIterator[Resp]:
        """A bulk stream: each request handled as its unary call would be, a window of them at once."""

        async def one(request: Req) -> Resp:
            return await handle(request, self._timeout(context))

        return ordered_pipeline(requests, one, self._settings.stream_window)

    async def ListModels(
        self, request: enc.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> enc.ListModelsResponse:
        return enc.ListModelsResponse(models=[card.to_proto() for card in self._router.cards])

    async def Encode(
        self, request: enc.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> enc.EncodeResponse:
        return await self._encoding.encode(request, self._timeout(context))

    async def EncodeStream(
        self, request_iterator: AsyncIterator[enc.EncodeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[enc.EncodeResponse]:
        async for response in self._streamed(request_iterator, context, self._encoding.encode):
            yield response

    async def Similarity(
        self, request: gw.SimilarityRequest, context: grpc.aio.ServicerContext
    ) -> gw.SimilarityResponse:
        return await self._similarities.similarity(request, self._timeout(context))

    async def Search(self, request: gw.SearchRequest, context: grpc.aio.ServicerContext) -> gw.SearchResponse:
        if request.all_spaces:
            return await self._fused.search(request, self._timeout(context))
        return await self._indexer.search(request, self._timeout(context))

    async def HybridSearch(
        self, request: gw.HybridSearchRequest, context: grpc.aio.ServicerContext
    ) -> gw.SearchResponse:
        return await self._hybrid.search(request, self._timeout(context))

    async def Upsert(self, request: gw.UpsertRequest, context: grpc.aio.ServicerContext) -> gw.UpsertResponse:
        return await self._indexer.upsert(request, self._timeout(context))

    async def UpsertStream(
        self, request_iterator: AsyncIterator[gw.UpsertRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gw.UpsertResponse]:
        async for response in self._streamed(request_iterator, context, self._indexer.upsert):
            yield response

    async def Delete(self, request: gw.DeleteRequest, context: grpc.aio.ServicerContext) -> gw.DeleteResponse:
        return await self._indexer.delete(request, self._timeout(context))

    async def DropSpace(
        self, request: gw.DropSpaceRequest, context: grpc.aio.ServicerContext
    ) -> gw.DropSpaceResponse:
        return await self._indexer.drop_space(request, self._timeout(context))

    async def Recommend(
        self, request: rec.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> rec.RecommendResponse:
        return await self._recommendations.recommend(request, self._timeout(context))

    async def Score(self, request: rec.ScoreRequest, context: grpc.aio.ServicerContext) -> rec.ScoreResponse:
        return await self._recommendations.score(request, self._timeout(context))

    async def SimilarItems(
        self, request: rec.SimilarItemsRequest, context: grpc.aio.ServicerContext
    ) -> rec.RecommendResponse:
        return await self._recommendations.similar_items(request, self._timeout(context))

    async def FoldIn(
        self, request: rec.FoldInRequest, context: grpc.aio.ServicerContext
    ) -> rec.FoldInResponse:
        return await self._recommendations.fold_in(request, self._timeout(context))

    async def FoldInItems(
        self, request: cpb.FoldInItemsRequest, context: grpc.aio.ServicerContext
    ) -> cpb.FoldInItemsResponse:
        return await self._cold_start.fold_in_items(request, self._timeout(context))

    async def Fit(
        self, request_iterator: AsyncIterator[rec.FitRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rec.FitProgress]:
        remaining = context.time_remaining()
        timeout = self._settings.fit_timeout_s if remaining is None else remaining
        requests = self._cold_start.fit_requests(request_iterator, timeout)
        async for progress in self._recommendations.fit(requests, timeout):
            yield progress
