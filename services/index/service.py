"""The Index gRPC service over one shard's store: checks every request, then writes or searches."""

from collections.abc import AsyncIterator

import grpc
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import index_pb2_grpc as idx_grpc
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument, NotFound
from services.common.inputs import check_kinds
from services.common.items import ItemRules
from services.common.streaming import ordered_pipeline
from services.common.topk import check_k
from services.common.vectors import unit_vector
from services.index.records import Generation, Item, Op
from services.index.settings import IndexSettings
from services.index.space import Space
from services.index.store import IndexStore

# The largest dimension a space may be claimed with (far past any embedding model's).
MAX_DIMENSION = 65_536


class IndexService(idx_grpc.IndexServicer):
    def __init__(self, store: IndexStore, settings: IndexSettings, shard: str) -> None:
        self._store = store
        self._settings = settings
        self._items = ItemRules(settings.max_id_bytes, settings.max_payload_bytes, "INDEX_")
        self._shard = shard

    def _check_space(self, space: str) -> None:
        if not space:
            raise InvalidArgument("is empty; name the space the items belong to", field="space")

    def _check_count(self, count: int, field: str) -> None:
        limit = self._settings.max_items_per_request
        if count == 0:
            raise InvalidArgument("is empty", field=field)
        if count > limit:
            raise InvalidArgument(
                f"has {count} entries; the limit is {limit} per request (INDEX_MAX_ITEMS_PER_REQUEST): "
                "split it, or use UpsertStream",
                field=field,
            )

    def _ops(self, request: idx.IndexUpsertRequest) -> list[Op]:
        self._store.check_open()
        self._check_space(request.space)
        self._check_count(len(request.items), "items")
        epoch = request.space_epoch
        held = self._store.held_epoch(request.space)
        if held is not None and held > epoch:
            raise self._store.stale(request.space, epoch)
        ops = []
        # None: a new space (or a new generation of it), whose first vector sets its dimension.
        known = dimension = (
            None if held is not None and held < epoch else self._store.dimension(request.space)
        )
        for position, item in enumerate(request.items):
            field = f"items[{position}]"
            self._items.check(item.id, item.payload_json, field)
            check_kinds([item.kind], f"{field}.kind")
            if not item.HasField("vector"):
                raise InvalidArgument("is missing", field=f"{field}.vector")
            vector = unit_vector(item.vector, f"{field}.vector")
            if dimension is None:
                dimension = vector.shape[0]
            elif vector.shape[0] != dimension:
                holder = (
                    f"space {request.space!r} holds {dimension}-dimensional vectors"
                    if known is not None
                    else f"items[0].vector, the first of new space {request.space!r}, has {dimension}"
                )
                raise InvalidArgument(
                    f"has {vector.shape[0]} dimensions but {holder}", field=f"{field}.vector"
                )
            stored = Item(item.id, vector, item.kind, item.payload_json, item.model.id, item.model.version)
            ops.append(Op(request.space, item.id, stored))
        # Claimed only once every item passed, so a refused request leaves a new space unclaimed (nothing
        # awaits between the dimension read above and this, so no other request can claim it meanwhile).
        assert dimension is not None  # _check_count refused an empty request
        renewal = self._store.generation(request.space, epoch, dimension)
        self._store.claim_dimension(request.space, dimension, "items[0].vector", new_generation=bool(renewal))
        return renewal + ops

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
            self._items.check_id(item_id, f"ids[{position}]")
        held = self._held(request.space, request.space_epoch)
        present = {item_id for item_id in request.ids if held is not None and item_id in held.row_of}
        if present:
            await self._store.write([Op(request.space, item_id) for item_id in present])
        return idx.IndexDeleteResponse(deleted=len(present), not_found=len(set(request.ids)) - len(present))

    def _held(self, space: str, epoch: int) -> Space | None:
        """The space's generation `epoch` as held here (None: none of that generation, nothing to find);
        FAILED_PRECONDITION when a newer one is held (the caller's claim is stale)."""
        held = self._store.spaces.get(space)
        if held is not None and held.epoch > epoch:
            raise self._store.stale(space, epoch)
        return held if held is not None and held.epoch == epoch else None

    async def Search(
        self, request: idx.IndexSearchRequest, context: grpc.aio.ServicerContext
    ) -> idx.IndexSearchResponse:
        self._store.check_open()
        self._check_space(request.space)
        check_k(request.k, self._settings.max_k, "INDEX_MAX_K")
        check_kinds(request.filter.kinds, "filter.kinds")
        query = unit_vector(request.query, "query")
        if self._held(request.space, request.space_epoch) is None and request.space in self._store.spaces:
            return idx.IndexSearchResponse(shard=self._shard)  # only an older generation is held: nothing
        dimension = self._store.dimension(request.space)
        if dimension is None:
            raise NotFound(f"space {request.space!r} holds no items on shard {self._shard}")
        if query.shape[0] != dimension:
            raise InvalidArgument(
                f"has {query.shape[0]} dimensions but space {request.space!r} holds {dimension}-dimensional vectors",
                field="query",
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
                    space=held.name,
                    dimension=held.dimension,
                    count=held.live,
                    engine=held.engine.name,
                    epoch=held.epoch,
                )
                for held in self._store.held(request.space)
            ],
        )

    async def ClaimSpace(
        self, request: idx.ClaimSpaceRequest, context: grpc.aio.ServicerContext
    ) -> idx.SpaceClaim:
        self._store.check_open()
        self._check_space(request.space)
        if not 1 <= request.dimension <= MAX_DIMENSION:
            raise InvalidArgument(f"is {request.dimension}; use 1..{MAX_DIMENSION}", field="dimension")
        claim = await self._store.claims.claim(request.space, request.dimension)
        return idx.SpaceClaim(space=claim.space, dimension=claim.dimension, epoch=claim.epoch)

    async def LookupSpace(
        self, request: idx.LookupSpaceRequest, context: grpc.aio.ServicerContext
    ) -> idx.SpaceClaim:
        self._store.check_open()
        self._check_space(request.space)
        claim = self._store.claims.lookup(request.space)
        if claim is None:
            raise NotFound(f"space {request.space!r} was never claimed here")
        return idx.SpaceClaim(space=claim.space, dimension=claim.dimension, epoch=claim.epoch)

    async def DropSpace(
        self, request: idx.IndexDropSpaceRequest, context: grpc.aio.ServicerContext
    ) -> idx.IndexDropSpaceResponse:
        self._store.check_open()
        self._check_space(request.space)
        epoch = await self._store.claims.drop(request.space) if request.claim else request.epoch
        held = self._store.spaces.get(request.space)
        if held is None or held.epoch > epoch:
            return idx.IndexDropSpaceResponse(dropped=0, epoch=epoch)
        dropped = held.live
        await self._store.write([Op(request.space, generation=Generation(epoch, 0))])
        return idx.IndexDropSpaceResponse(dropped=dropped, epoch=epoch)
