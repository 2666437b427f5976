"""The gateway's Encode, and encoding through the cache, which every call that encodes uses.

Through the cache: look every input up in one round trip, send only the misses (each distinct input once)
to the worker, write them back, and return results in request order. The vectors are the models' raw
float32 output; the caller's options (normalise, truncate, dtype) are applied after it.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument, ServiceError, Unavailable
from services.common.inputs import check_batch_size
from services.common.model_card import ModelCard
from services.common.vectors import check_options, from_wire, shape
from services.gateway import metrics
from services.gateway.cache import RawVector, VectorCache, cache_key
from services.gateway.choosing import ModelChooser
from services.gateway.routing import Router


@dataclass
class Encoded:
    model: pb.ModelRef
    vectors: list[RawVector]
    cached: list[bool]

    def matrix(self) -> np.ndarray:
        """The raw vectors as rows of one float32 matrix."""
        return np.stack([raw.values for raw in self.vectors])


class CachingEncoder:
    def __init__(self, router: Router, cache: VectorCache) -> None:
        self._router = router
        self._cache = cache

    async def encode(
        self,
        card: ModelCard,
        inputs: Sequence[pb.Input],
        strict: bool,
        timeout: float,
        field: str = "inputs",
        positions: Sequence[int] | None = None,
    ) -> Encoded:
        """Raw vectors of `inputs` in order; error messages name input i as `field[positions[i]]`
        (default: `field[i]`)."""
        where = list(positions) if positions is not None else list(range(len(inputs)))
        keys = [cache_key(card.id, card.version, item) for item in inputs]
        found = dict(zip(keys, await self._cache.get_many(keys, card.id, card.dimension), strict=True))
        was_cached = {key: raw is not None for key, raw in found.items()}
        hits = sum(1 for key in keys if was_cached[key])
        metrics.CACHE_HITS.labels(card.id).inc(hits)
        metrics.CACHE_MISSES.labels(card.id).inc(len(keys) - hits)

        model = card.ref()
        first_position = {key: position for position, key in reversed(list(enumerate(keys)))}
        missing = sorted(position for key, position in first_position.items() if not was_cached[key])
        if missing:
            model, fresh = await self._from_worker(
                card, inputs, missing, strict, timeout, [where[p] for p in missing], field
            )
            if model.version != card.version and len(missing) < len(first_position):
                # The worker serves a newer version than the router knew: the cached vectors are the old
                # version's, so every input is encoded again rather than mixing two versions' vectors.
                cached = sorted(set(first_position.values()) - set(missing))
                was_cached = dict.fromkeys(keys, False)
                model, again = await self._from_worker(
                    card, inputs, cached, strict, timeout, [where[p] for p in cached], field
                )
                fresh.update(again)
            for position, raw in fresh.items():
                found[keys[position]] = raw
            await self._cache.put_many(
                {cache_key(model.id, model.version, inputs[p]): raw for p, raw in fresh.items()}
            )

        vectors = [found[key] for key in keys]
        if strict:
            for position, entry in enumerate(vectors):
                if entry is not None and entry.truncated:
                    raise InvalidArgument(
                        f"is longer than model {card.id!r} takes ({card.max_input_tokens} tokens); "
                        "options.strict is set: unset it to embed the first tokens only",
                        field=f"{field}[{where[position]}]",
                    )
        return Encoded(model, [raw for raw in vectors if raw is not None], [was_cached[key] for key in keys])

    async def _from_worker(
        self,
        card: ModelCard,
        inputs: Sequence[pb.Input],
        positions: list[int],
        strict: bool,
        timeout: float,
        caller_positions: list[int],
        field: str,
    ) -> tuple[pb.ModelRef, dict[int, RawVector]]:
        """The worker's vectors of `inputs[p]` for each p in `positions`, checked: one per input, each of one
        dimension (the card's, unless the worker answers for a newer version)."""
        try:
            response = await self._router.encode(card.id, [inputs[p] for p in positions], strict, timeout)
        except ServiceError as error:
            raise error.moved("inputs", caller_positions, field) from None
        vectors = [from_wire(embedding.vector) for embedding in response.embeddings]
        dimensions = {vector.shape[0] for vector in vectors}
        expected = {card.dimension} if response.model.version == card.version else dimensions
        if len(vectors) != len(positions) or len(dimensions) != 1 or dimensions != expected:
            raise Unavailable(
                f"the worker serving {card.id!r} answered {len(vectors)} vectors of {sorted(dimensions)} dimensions "
                f"for {len(positions)} inputs of a {card.dimension}-d model; retry shortly"
            )
        raws = {
            position: RawVector(vector, embedding.input_tokens, embedding.truncated)
            for position, vector, embedding in zip(positions, vectors, response.embeddings, strict=True)
        }
        return response.model, raws


class Encoding:
    """The public Encode: the model named or the default for the inputs' kind, through the cache, then
    shaped as the options ask."""

    def __init__(self, models: ModelChooser, encoder: CachingEncoder, max_inputs_per_request: int) -> None:
        self._models = models
        self._encoder = encoder
        self._max_inputs = max_inputs_per_request

    async def encode(self, request: enc.EncodeRequest, timeout: float) -> enc.EncodeResponse:
        check_batch_size(request.inputs, self._max_inputs)
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
