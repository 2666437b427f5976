"""The gateway's index calls: encode what needs encoding (through the cache), check it, and hand it to
the index (index_backend.py: the built-in shards, or Milvus), which keeps the spaces' rules.

Spaces: a search or an input upsert must name a space some model writes into (or take the model's);
vector upserts may also create a space of their own ("bring your own vectors"), whose dimension is
then fixed by its first vector.
"""

import time

import numpy as np
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument
from services.common.inputs import check_batch_size, check_kinds, kind_of
from services.common.items import ItemRules
from services.common.model_card import ModelCard
from services.common.topk import check_k
from services.common.vectors import l2_normalize, to_wire, unit_vector
from services.gateway.choosing import ModelChooser
from services.gateway.encoding import CachingEncoder
from services.gateway.index_backend import IndexBackend, Merged, check_dimension, invalid_space
from services.gateway.routing import Router
from services.gateway.settings import GatewaySettings


class Indexer:
    def __init__(
        self,
        router: Router,
        models: ModelChooser,
        encoder: CachingEncoder,
        index: IndexBackend,
        settings: GatewaySettings,
    ) -> None:
        self._router = router
        self._models = models
        self._encoder = encoder
        self._index = index
        self._settings = settings
        self._items = ItemRules(settings.max_id_bytes, settings.max_payload_bytes, "GATEWAY_")

    def _model_spaces(self) -> set[str]:
        return {card.space for card in self._router.cards}

    def _model_dimension(self, space: str) -> int | None:
        return next((card.dimension for card in self._router.cards if card.space == space), None)

    def _check_vector(self, vector: pb.Vector, space: str, field: str) -> np.ndarray:
        values = unit_vector(vector, field)
        check_dimension(values.shape[0], self._model_dimension(space), space, field)
        return values

    async def search(self, request: gw.SearchRequest, timeout: float) -> gw.SearchResponse:
        deadline = time.monotonic() + timeout
        check_k(request.k, self._settings.max_k, "GATEWAY_MAX_K")
        check_kinds(request.filter.kinds, "filter.kinds")
        space, model = request.space, pb.ModelRef()
        if request.HasField("input"):
            card = self._models.card_for(request.model, [request.input], "input", space)
            space = card.space
            encoded = await self._encoder.encode(card, [request.input], False, timeout, "input")
            query = l2_normalize(encoded.matrix())[0]
            model = encoded.model
        elif request.HasField("vector"):
            if not space:
                raise InvalidArgument("a vector query needs `space`: the space the vector belongs to")
            query = self._check_vector(request.vector, space, "vector")
        else:
            raise InvalidArgument("the query is empty: set `input` (to encode) or `vector`")
        field = "input" if request.HasField("input") else "vector"
        merged = await self._index.search(space, query, request.k, request.filter, field, deadline)
        if merged is None:  # no vector was ever stored in the space
            if space not in self._model_spaces():
                raise invalid_space(space, self._model_spaces())
            merged = Merged([], [])
        return gw.SearchResponse(
            hits=merged.hits,
            space=space,
            partial=bool(merged.missing),
            missing_shards=merged.missing,
            query_model=model,
        )

    async def upsert(self, request: gw.UpsertRequest, timeout: float) -> gw.UpsertResponse:
        deadline = time.monotonic() + timeout
        check_batch_size(request.items, self._settings.max_inputs_per_request, "items")
        for position, item in enumerate(request.items):
            field = f"items[{position}]"
            self._items.check(item.id, item.payload_json, field)
            if not item.HasField("input") and not item.HasField("vector"):
                raise InvalidArgument("has neither `input` nor `vector`", field=field)
        space, cards = self._resolve(request)
        vectors: list[pb.Vector | None] = [None] * len(request.items)
        kinds = [0] * len(request.items)
        refs = [pb.ModelRef(space=space)] * len(request.items)
        for card, positions in cards:
            inputs = [request.items[p].input for p in positions]
            encoded = await self._encoder.encode(card, inputs, False, timeout, "items", positions)
            for position, row in zip(positions, l2_normalize(encoded.matrix()), strict=True):
                vectors[position] = to_wire(row)
                kinds[position] = kind_of(request.items[position].input, position)
                refs[position] = encoded.model
        first: tuple[str, int] | None = None  # the vectors must agree with the first one
        for position, item in enumerate(request.items):
            if item.HasField("vector"):
                field = f"items[{position}].vector"
                values = self._check_vector(item.vector, space, field)
                if first is None:
                    first = (field, values.shape[0])
                elif values.shape[0] != first[1]:
                    raise InvalidArgument(
                        f"has {values.shape[0]} dimensions but {first[0]} has {first[1]}; the vectors "
                        f"of space {space!r} must all have one dimension",
                        field=field,
                    )
                vectors[position] = to_wire(values)
        items = [
            idx.IndexItem(id=item.id, vector=vector, kind=kind, payload_json=item.payload_json, model=ref)
            for item, vector, kind, ref in zip(request.items, vectors, kinds, refs, strict=True)
        ]
        if first is None:  # only inputs: the model's dimension
            first = ("items[0]", items[0].vector.dim)
        await self._index.upsert(space, items, first, request.request_id, deadline)
        return gw.UpsertResponse(upserted=len(items), request_id=request.request_id)

    def _resolve(self, request: gw.UpsertRequest) -> tuple[str, list[tuple[ModelCard, list[int]]]]:
        """The space the items go to, and which model encodes which items (by position)."""
        by_kind: dict[int, list[int]] = {}
        for position, item in enumerate(request.items):
            if item.HasField("input"):
                by_kind.setdefault(kind_of(item.input, position), []).append(position)
        space = request.space
        if request.model:
            card = self._models.card_for(
                request.model, [request.items[p].input for ps in by_kind.values() for p in ps], "items", space
            )
            space = card.space
            cards = [(card, sorted(p for ps in by_kind.values() for p in ps))] if by_kind else []
            return space, cards
        if not space:
            if not by_kind:
                raise InvalidArgument("vector items need `space`: the space their vectors belong to")
            space = self._models.shared_space(by_kind)
            if not space:
                raise InvalidArgument(
                    "the items' input kinds have no model in one shared space; set `space` or `model`, or "
                    "send each kind separately"
                )
        if not by_kind:
            self._check_space_name(space)
        cards = [(self._models.default_card(kind, space), positions) for kind, positions in by_kind.items()]
        return space, cards

    @staticmethod
    def _check_space_name(space: str) -> None:
        if len(space) > 128 or not space.isprintable():
            raise InvalidArgument("space must be at most 128 printable characters")

    async def delete(self, request: gw.DeleteRequest, timeout: float) -> gw.DeleteResponse:
        if not request.space:
            raise InvalidArgument("space is empty; name the space to delete from")
        check_batch_size(request.ids, self._settings.max_inputs_per_request, "ids")
        for position, item_id in enumerate(request.ids):
            self._items.check_id(item_id, f"ids[{position}]")
        deleted, not_found = await self._index.delete(
            request.space, list(request.ids), time.monotonic() + timeout
        )
        return gw.DeleteResponse(deleted=deleted, not_found=not_found)

    async def drop_space(self, request: gw.DropSpaceRequest, timeout: float) -> gw.DropSpaceResponse:
        """The space and its items, gone for every search and write at once (on the shards: its claim first,
        then its items on every shard that answers; the others are listed)."""
        if not request.space:
            raise InvalidArgument("space is empty; name the space to drop")
        dropped, missing = await self._index.drop_space(request.space, time.monotonic() + timeout)
        return gw.DropSpaceResponse(dropped=dropped, missing_shards=missing)
