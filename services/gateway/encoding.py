"""Encoding through the cache: look every input up in one round trip, send only the misses (each
distinct input once) to the worker, write them back, and return results in request order."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from embeddings.v1 import types_pb2 as pb

from services.common import metrics
from services.common.backend import ModelCard
from services.common.errors import InvalidArgument, ServiceError
from services.common.vectors import from_wire
from services.gateway.cache import RawVector, VectorCache, cache_key
from services.gateway.routing import Router, remap_input_indices


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
        found = dict(zip(keys, await self._cache.get_many(keys), strict=True))
        was_cached = {key: raw is not None for key, raw in found.items()}
        hits = sum(1 for key in keys if was_cached[key])
        metrics.CACHE_HITS.labels(card.id).inc(hits)
        metrics.CACHE_MISSES.labels(card.id).inc(len(keys) - hits)

        model = card.ref()
        first_position = {key: position for position, key in reversed(list(enumerate(keys)))}
        missing = sorted(position for key, position in first_position.items() if not was_cached[key])
        if missing:
            try:
                response = await self._router.encode(card.id, [inputs[p] for p in missing], strict, timeout)
            except ServiceError as error:
                raise remap_input_indices(error, [where[p] for p in missing], field) from None
            model = response.model
            fresh: dict[str, RawVector] = {}
            for position, embedding in zip(missing, response.embeddings, strict=True):
                raw = RawVector(from_wire(embedding.vector), embedding.input_tokens, embedding.truncated)
                fresh[cache_key(model.id, model.version, inputs[position])] = raw
                found[keys[position]] = raw
            await self._cache.put_many(fresh)

        vectors = [found[key] for key in keys]
        if strict:
            for position, entry in enumerate(vectors):
                if entry is not None and entry.truncated:
                    raise InvalidArgument(
                        f"{field}[{where[position]}] is longer than model {card.id!r} takes "
                        f"({card.max_input_tokens} tokens); options.strict is set: unset it to embed "
                        "the first tokens only"
                    )
        return Encoded(model, [raw for raw in vectors if raw is not None], [was_cached[key] for key in keys])
