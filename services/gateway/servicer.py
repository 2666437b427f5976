"""The public Gateway service."""

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import gateway_pb2_grpc as gw_grpc
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument
from services.common.inputs import check_batch_size, kind_of
from services.common.streaming import ordered_pipeline
from services.common.vectors import check_options, l2_normalize, shape
from services.gateway.choosing import ModelChooser
from services.gateway.encoding import CachingEncoder
from services.gateway.indexing import Indexer
from services.gateway.recommending import Recommendations
from services.gateway.routing import Router
from services.gateway.settings import GatewaySettings
from services.gateway.sharding import ShardSet


class GatewayService(gw_grpc.GatewayServicer):
    def __init__(
        self,
        router: Router,
        encoder: CachingEncoder,
        shards: ShardSet,
        recommendations: Recommendations,
        settings: GatewaySettings,
    ) -> None:
        self._router = router
        self._recommendations = recommendations
        self._encoder = encoder
        self._settings = settings
        self._models = ModelChooser(
            router,
            {
                pb.INPUT_KIND_TEXT: settings.default_text_model,
                pb.INPUT_KIND_IMAGE: settings.default_image_model,
                pb.INPUT_KIND_USER: settings.default_useritem_model,
                pb.INPUT_KIND_ITEM: settings.default_useritem_model,
            },
        )
        self._indexer = Indexer(router, self._models, encoder, shards, settings)

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return (
            self._settings.worker_timeout_s
            if remaining is None
            else min(remaining, self._settings.worker_timeout_s)
        )

    async def ListModels(
        self, request: enc.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> enc.ListModelsResponse:
        return enc.ListModelsResponse(models=[card.to_proto() for card in self._router.cards])

    async def Encode(
        self, request: enc.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> enc.EncodeResponse:
        return await self._encode(request, self._timeout(context))

    async def EncodeStream(
        self, request_iterator: AsyncIterator[enc.EncodeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[enc.EncodeResponse]:
        async def handle(request: enc.EncodeRequest) -> enc.EncodeResponse:
            return await self._encode(request, self._timeout(context))

        async for response in ordered_pipeline(request_iterator, handle, self._settings.stream_window):
            yield response

    async def _encode(self, request: enc.EncodeRequest, timeout: float) -> enc.EncodeResponse:
        check_batch_size(request.inputs, self._settings.max_inputs_per_request)
        card = self._models.card_for(request.model, request.inputs, "inputs")
        check_options(request.options, card.dimension, card.id)
        encoded = await self._encoder.encode(card, request.inputs, request.options.strict, timeout)
        vectors = shape(encoded.matrix(), request.options)
        return enc.EncodeResponse(
            model=encoded.model,
            request_id=request.request_id,
            embeddings=[
                pb.Embedding(vector=vector, truncated=raw.truncated, input_tokens=raw.tokens, cached=cached)
                for vector, raw, cached in zip(vectors, encoded.vectors, encoded.cached, strict=True)
            ],
        )

    async def Similarity(
        self, request: gw.SimilarityRequest, context: grpc.aio.ServicerContext
    ) -> gw.SimilarityResponse:
        limit = self._settings.max_inputs_per_request
        check_batch_size(request.queries, limit, "queries")
        check_batch_size(request.candidates, limit, "candidates")
        pairwise = request.mode == gw.SIMILARITY_MODE_PAIRWISE
        if pairwise and len(request.queries) != len(request.candidates):
            raise InvalidArgument(
                f"mode PAIRWISE needs as many candidates as queries; got {len(request.queries)} queries "
                f"and {len(request.candidates)} candidates"
            )
        space = request.space or self._shared_space(request)
        query_card = self._models.card_for(request.query_model, request.queries, "queries", space)
        candidate_card = self._models.card_for(
            request.candidate_model, request.candidates, "candidates", space or query_card.space
        )
        if candidate_card.space != query_card.space:
            raise InvalidArgument(
                f"queries are encoded by {query_card.id!r} in space {query_card.space!r} but candidates by "
                f"{candidate_card.id!r} in space {candidate_card.space!r}; vectors of different spaces "
                "cannot be compared: pick models of one space"
            )
        timeout = self._timeout(context)
        queries, candidates = await asyncio.gather(
            self._encoder.encode(query_card, request.queries, False, timeout, "queries"),
            self._encoder.encode(candidate_card, request.candidates, False, timeout, "candidates"),
        )
        left, right = l2_normalize(queries.matrix()), l2_normalize(candidates.matrix())
        if pairwise:
            scores = np.einsum("ij,ij->i", left, right)
            rows, cols = len(scores), 1
        else:
            scores = left @ right.T
            rows, cols = scores.shape
        return gw.SimilarityResponse(
            scores=scores.ravel().tolist(),
            rows=rows,
            cols=cols,
            space=query_card.space,
            query_model=queries.model,
            candidate_model=candidates.model,
        )

    def _shared_space(self, request: gw.SimilarityRequest) -> str:
        """With no model named and queries and candidates of different kinds (text against images), a
        space where both kinds have a model (see ModelChooser.shared_space); else empty."""
        if request.query_model or request.candidate_model:
            return ""
        query_kinds = {kind_of(item, index) for index, item in enumerate(request.queries)}
        candidate_kinds = {kind_of(item, index) for index, item in enumerate(request.candidates)}
        if len(query_kinds) != 1 or len(candidate_kinds) != 1 or query_kinds == candidate_kinds:
            return ""
        return self._models.shared_space([*query_kinds, *candidate_kinds])

    async def Search(self, request: gw.SearchRequest, context: grpc.aio.ServicerContext) -> gw.SearchResponse:
        return await self._indexer.search(request, self._timeout(context))

    async def Upsert(self, request: gw.UpsertRequest, context: grpc.aio.ServicerContext) -> gw.UpsertResponse:
        return await self._indexer.upsert(request, self._timeout(context))

    async def UpsertStream(
        self, request_iterator: AsyncIterator[gw.UpsertRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gw.UpsertResponse]:
        async def handle(request: gw.UpsertRequest) -> gw.UpsertResponse:
            return await self._indexer.upsert(request, self._timeout(context))

        async for response in ordered_pipeline(request_iterator, handle, self._settings.stream_window):
            yield response

    async def Delete(self, request: gw.DeleteRequest, context: grpc.aio.ServicerContext) -> gw.DeleteResponse:
        return await self._indexer.delete(request, self._timeout(context))

    async def Recommend(
        self, request: rec.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> rec.RecommendResponse:
        return await self._recommendations.recommend(request, self._timeout(context))

    async def SimilarItems(
        self, request: rec.SimilarItemsRequest, context: grpc.aio.ServicerContext
    ) -> rec.RecommendResponse:
        return await self._recommendations.similar_items(request, self._timeout(context))

    async def FoldIn(
        self, request: rec.FoldInRequest, context: grpc.aio.ServicerContext
    ) -> rec.FoldInResponse:
        return await self._recommendations.fold_in(request, self._timeout(context))

    async def Fit(
        self, request_iterator: AsyncIterator[rec.FitRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rec.FitProgress]:
        remaining = context.time_remaining()
        timeout = self._settings.fit_timeout_s if remaining is None else remaining
        async for progress in self._recommendations.fit(request_iterator, timeout):
            yield progress
