"""The gateway's Similarity: both sides encoded through the cache in one space, then cosine scores (every
query against every candidate, or pairwise)."""

import asyncio

import numpy as np
from embeddings.v1 import gateway_pb2 as gw

from services.common.errors import InvalidArgument
from services.common.inputs import check_batch_size, kind_of
from services.common.vectors import l2_normalize
from services.gateway.choosing import ModelChooser
from services.gateway.encoding import CachingEncoder


class Similarities:
    def __init__(self, models: ModelChooser, encoder: CachingEncoder, max_inputs_per_request: int) -> None:
        self._models = models
        self._encoder = encoder
        self._max_inputs = max_inputs_per_request

    async def similarity(self, request: gw.SimilarityRequest, timeout: float) -> gw.SimilarityResponse:
        check_batch_size(request.queries, self._max_inputs, "queries")
        check_batch_size(request.candidates, self._max_inputs, "candidates")
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
