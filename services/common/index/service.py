"""The Index gRPC service over one shard's store: checks every request, then writes or searches."""

import json
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import index_pb2_grpc as idx_grpc
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument, ServiceError
from services.common.index.records import Item, Op
from services.common.index.settings import IndexSettings
from services.common.index.store import IndexStore
from services.common.streaming import ordered_pipeline
from services.common.vectors import from_wire

_KINDS = set(pb.InputKind.values())


def check_payload(payload_json: str, limit: int, field: str) -> None:
    """An item's payload is empty or a JSON object of at most `limit` bytes."""
    if not payload_json:
        return
    size = len(payload_json.encode())
    if size > limit:
        raise InvalidArgument(f"{field} is {size} bytes; the limit is {limit} (INDEX_MAX_PAYLOAD_BYTES)")
    try:
        payload = json.loads(payload_json)
    except ValueError as error:
        raise InvalidArgument(f"{field} is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise InvalidArgument(f"{field} must be a JSON object, not {type(payload).__name__}")


def check_id(item_id: str, limit: int, field: str) -> None:
    if not item_id:
        raise InvalidArgument(f"{field} is empty; every item needs an id")
    if len(item_id.encode()) > limit:
        raise InvalidArgument(f"{field} is longer than {limit} bytes (INDEX_MAX_ID_BYTES)")


def check_k(k: int, limit: int, variable: str) -> None:
    if not 1 <= k <= limit:
        raise InvalidArgument(f"k={k} is out of range; use 1..{limit} ({variable})")


def check_kinds(kinds: Sequence[int], field: str) -> None:
    unknown = [kind for kind in kinds if kind not in _KINDS]
    if unknown:
        raise InvalidArgument(f"{field} has unknown InputKind values {unknown}")


def unit_vector(vector: pb.Vector, field: str) -> np.ndarray:
    """A finite, non-zero wire vector scaled to unit length (inner product is then cosine)."""
    values = from_wire(vector, field)
    norm = float(np.linalg.norm(values))
    if norm == 0.0:
        raise InvalidArgument(f"{field} is all zeros; a zero vector has no direction to search by")
    return (values / norm).astype(np.float32)


class IndexService(idx_grpc.IndexServicer):
    def __init__(self, store: IndexStore, settings: IndexSettings, shard: str) -> None:
        self._store = store
        self._settings = settings
        self._shard = shard

    def _check_space(self, space: str) -> None:
        if not space:
            raise InvalidArgument("space is empty; name the space the items belong to")

    def _check_count(self, count: int, field: str) -> None:
        limit = self._settings.max_items_per_request
        if count == 0:
            raise InvalidArgument(f"{field} is empty")
        if count > limit:
            raise InvalidArgument(
                f"{field} has {count} entries; the limit is {limit} per request (INDEX_MAX_ITEMS_PER_REQUEST): "
                "split it, or use UpsertStream"
            )

    def _ops(self, request: idx.IndexUpsertRequest) -> list[Op]:
        self._store.check_open()
        self._check_space(request.space)
        self._check_count(len(request.items), "items")
        ops = []
        # None: a new space, whose first vector sets its dimension.
        known = dimension = self._store.dimension(request.space)
        for position, item in enumerate(request.items):
            field = f"items[{position}]"
            check_id(item.id, self._settings.max_id_bytes, f"{field}.id")
            check_payload(item.payload_json, self._settings.max_payload_bytes, f"{field}.payload_json")
            check_kinds([item.kind], f"{field}.kind")
            if not item.HasField("vector"):
                raise InvalidArgument(f"{field}.vector is missing")
            vector = unit_vector(item.vector, f"{field}.vector")
            if dimension is None:
                dimension = vector.shape[0]
            elif vector.shape[0] != dimension:
                holder = (
                    f"space {request.space!r} holds {dimension}-dimensional vectors"
                    if known is not None
                    else f"items[0].vector, the first of new space {request.space!r}, has {dimension}"
                )
                raise InvalidArgument(f"{field}.vector has {vector.shape[0]} dimensions but {holder}")
            stored = Item(item.id, vector, item.kind, item.payload_json, item.model.id, item.model.version)
            ops.append(Op(request.space, item.id, stored))
        # Claimed only once every item passed, so a refused request leaves a new space unclaimed (nothing
        # awaits between the dimension read above and this, so no other request can claim it meanwhile).
        assert dimension is not None  # _check_count refused an empty request
        self._store.claim_dimension(request.space, dimension, "items[0].vector")
        return ops

    async def Upsert(
        self, request: idx.IndexUpsertRequest, context: grpc.aio.ServicerContext
    ) -> idx.IndexUpsertResponse:
        return await self._upsert(request)

    async def _upsert(self, request: idx.IndexUpsertRequest) -> idx.IndexUpsertResponse:
        ops = self._ops(request)
        await self._store.write(ops)
        return idx.IndexUpsertResponse(upserted=len(ops), request_id=request.request_id)

    async def UpsertStream(
        self, request_iterator: AsyncIterator[idx.IndexUpsertRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[idx.IndexUpsertResponse]:
        async for response in ordered_pipeline(request_iterator, self._upsert, self._settings.stream_window):
            yield response

    async def Delete(
        self, request: idx.IndexDeleteRequest, context: grpc.aio.ServicerContext
    ) -> idx.IndexDeleteResponse:
        self._store.check_open()
        self._check_space(request.space)
        self._check_count(len(request.ids), "ids")
        for position, item_id in enumerate(request.ids):
            check_id(item_id, self._settings.max_id_bytes, f"ids[{position}]")
        held = self._store.spaces.get(request.space)
        present = {item_id for item_id in request.ids if held is not None and item_id in held.row_of}
        if present:
            await self._store.write([Op(request.space, item_id) for item_id in present])
        return idx.IndexDeleteResponse(deleted=len(present), not_found=len(set(request.ids)) - len(present))

    async def Search(
        self, request: idx.IndexSearchRequest, context: grpc.aio.ServicerContext
    ) -> idx.IndexSearchResponse:
        self._store.check_open()
        self._check_space(request.space)
        check_k(request.k, self._settings.max_k, "INDEX_MAX_K")
        check_kinds(request.filter.kinds, "filter.kinds")
        query = unit_vector(request.query, "query")
        dimension = self._store.dimension(request.space)
        if dimension is None:
            raise ServiceError(
                f"space {request.space!r} holds no items on shard {self._shard}", grpc.StatusCode.NOT_FOUND
            )
        if query.shape[0] != dimension:
            raise InvalidArgument(
                f"query has {query.shape[0]} dimensions but space {request.space!r} holds "
                f"{dimension}-dimensional vectors"
            )
        found = await self._store.search(
            request.space, query, request.k, list(request.filter.kinds), dict(request.filter.payload_equals)
        )
        return idx.IndexSearchResponse(
            shard=self._shard,
            hits=[
                pb.Hit(
                    id=hit.id,
                    score=hit.score,
                    kind=hit.kind,
                    payload_json=hit.payload_json,
                    shard=self._shard,
                )
                for hit in found
            ],
        )

    async def Stats(
        self, request: idx.IndexStatsRequest, context: grpc.aio.ServicerContext
    ) -> idx.IndexStatsResponse:
        self._store.check_open()
        return idx.IndexStatsResponse(
            shard=self._shard,
            spaces=[
                idx.SpaceStats(
                    space=held.name, dimension=held.dimension, count=held.live, engine=held.engine.name
                )
                for held in self._store.held(request.space)
            ],
        )
