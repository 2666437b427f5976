"""The public Gateway service."""

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import gateway_pb2_grpc as gw_grpc
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb

from services.common.backend import ModelCard
from services.common.errors import InvalidArgument, Unimplemented
from services.common.inputs import check_batch_size, kind_name, kind_of
from services.common.streaming import ordered_pipeline
from services.common.vectors import check_options, l2_normalize, shape
from services.gateway.encoding import CachingEncoder
from services.gateway.routing import Router
from services.gateway.settings import GatewaySettings


class GatewayService(gw_grpc.GatewayServicer):
    def __init__(self, router: Router, encoder: CachingEncoder, settings: GatewaySettings) -> None:
        self._router = router
        self._encoder = encoder
        self._settings = settings
        self._preferred = {
            pb.INPUT_KIND_TEXT: settings.default_text_model,
            pb.INPUT_KIND_IMAGE: settings.default_image_model,
        }

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return (
            self._settings.worker_timeout_s
            if remaining is None
            else min(remaining, self._settings.worker_timeout_s)
        )

    def _card_for(self, model: str, inputs: Sequence[pb.Input], field: str, space: str = "") -> ModelCard:
        """The named model (checked against the inputs), or the default one for the inputs' kind."""
        kinds = sorted({kind_of(item, index) for index, item in enumerate(inputs)})
        if model:
            card = self._router.card(model)
            refused = [kind for kind in kinds if kind not in card.input_kinds]
            if refused:
                raise InvalidArgument(
                    f"model {model!r} does not accept {', '.join(map(kind_name, refused))} inputs; it accepts "
                    f"{', '.join(map(kind_name, card.input_kinds))}"
                )
        elif len(kinds) > 1:
            raise InvalidArgument(
                f"{field} mix {' and '.join(map(kind_name, kinds))} inputs and no model is named; "
                "name a model that accepts them all, or send each kind separately"
            )
        else:
            card = self._router.default_card(kinds[0], self._preferred.get(kinds[0], ""), space)
        if space and card.space != space:
            raise InvalidArgument(
                f"model {card.id!r} writes into space {card.space!r}, not the requested space {space!r}"
            )
        return card

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
        card = self._card_for(request.model, request.inputs, "inputs")
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
        query_card = self._card_for(request.query_model, request.queries, "queries", space)
        candidate_card = self._card_for(
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
        space where both kinds have a model: the default query model's space first, then the default
        candidate model's. Empty when there is none, or nothing to choose."""
        if request.query_model or request.candidate_model:
            return ""
        query_kinds = {kind_of(item, index) for index, item in enumerate(request.queries)}
        candidate_kinds = {kind_of(item, index) for index, item in enumerate(request.candidates)}
        if len(query_kinds) != 1 or len(candidate_kinds) != 1 or query_kinds == candidate_kinds:
            return ""
        (query_kind,), (candidate_kind,) = query_kinds, candidate_kinds
        spaces = self._router.spaces
        shared = spaces.get(query_kind, set()) & spaces.get(candidate_kind, set())
        if not shared:
            return ""
        for kind in (query_kind, candidate_kind):
            space = self._router.default_card(kind, self._preferred.get(kind, "")).space
            if space in shared:
                return space
        return min(shared, default="")

    async def Search(self, request: gw.SearchRequest, context: grpc.aio.ServicerContext) -> gw.SearchResponse:
        raise _not_yet("Search", "index shards")

    async def Upsert(self, request: gw.UpsertRequest, context: grpc.aio.ServicerContext) -> gw.UpsertResponse:
        raise _not_yet("Upsert", "index shards")

    async def UpsertStream(
        self, request_iterator: AsyncIterator[gw.UpsertRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gw.UpsertResponse]:
        raise _not_yet("UpsertStream", "index shards")
        yield  # an async generator, as the streaming contract requires

    async def Delete(self, request: gw.DeleteRequest, context: grpc.aio.ServicerContext) -> gw.DeleteResponse:
        raise _not_yet("Delete", "index shards")

    async def Recommend(
        self, request: rec.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> rec.RecommendResponse:
        raise _not_yet("Recommend", "the user-item worker")

    async def SimilarItems(
        self, request: rec.SimilarItemsRequest, context: grpc.aio.ServicerContext
    ) -> rec.RecommendResponse:
        raise _not_yet("SimilarItems", "the user-item worker")

    async def Fit(
        self, request_iterator: AsyncIterator[rec.FitRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rec.FitProgress]:
        raise _not_yet("Fit", "the user-item worker")
        yield  # an async generator, as the streaming contract requires


def _not_yet(method: str, needs: str) -> Unimplemented:
    return Unimplemented(f"Gateway.{method} needs {needs}, which this deployment does not have yet")
