"""The built-in index shards as the gateway's index (the default backend): the shards themselves
(sharding.py: which shard owns an id, fan-out, merge) and the spaces' claims on their home shards
(spaces.py: one dimension per space, generations that make DropSpace and re-creation safe)."""

from collections.abc import Sequence

import numpy as np
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import types_pb2 as pb

from services.common.errors import NotFound
from services.common.vectors import to_wire
from services.gateway.index_backend import Merged, check_dimension, search_budget, write_budget
from services.gateway.settings import GatewaySettings
from services.gateway.sharding import ShardSet
from services.gateway.spaces import SpaceClaims


class ShardBackend:
    def __init__(self, shards: ShardSet, settings: GatewaySettings) -> None:
        self.shards = shards
        self._spaces = SpaceClaims(shards, settings.space_claim_ttl_s)
        self._settings = settings

    async def start(self) -> None:
        await self.shards.start(self._settings.model_refresh_s, self._settings.shard_discovery_s)

    async def close(self) -> None:
        await self.shards.close()

    async def search(
        self, space: str, query: np.ndarray, k: int, filter: pb.SearchFilter, field: str, deadline: float
    ) -> Merged | None:
        limit_s = self._settings.shard_timeout_s

        async def search() -> Merged | None:
            claim = await self._spaces.lookup(space, search_budget(deadline, limit_s))
            if claim is None:
                return None
            check_dimension(query.shape[0], claim.dimension, space, field)
            request = idx.IndexSearchRequest(
                space=space, query=to_wire(query), k=k, filter=filter, space_epoch=claim.epoch
            )
            return await self.shards.search(request, search_budget(deadline, limit_s))

        return await self._spaces.retrying(space, search)

    async def upsert(
        self,
        space: str,
        items: Sequence[idx.IndexItem],
        dimension: tuple[str, int],
        request_id: str,
        deadline: float,
    ) -> None:
        budget = write_budget(deadline, self._settings.shard_timeout_s)
        field, size = dimension

        async def write() -> None:
            claim = await self._spaces.claim(space, size, budget)
            check_dimension(size, claim.dimension, space, field)
            await self.shards.upsert(space, items, request_id, budget, claim.epoch)

        await self._spaces.retrying(space, write)

    async def delete(self, space: str, ids: Sequence[str], deadline: float) -> tuple[int, int]:
        budget = write_budget(deadline, self._settings.shard_timeout_s)

        async def delete() -> tuple[int, int]:
            claim = await self._spaces.lookup(space, budget)
            if claim is None:  # nothing was ever stored in the space
                return 0, len(set(ids))
            return await self.shards.delete(space, ids, budget, claim.epoch)

        return await self._spaces.retrying(space, delete)

    async def drop_space(self, space: str, deadline: float) -> tuple[int, list[str]]:
        """The claim goes first, on the space's home shard: then the space is gone for every search and
        write, whatever the shards that did not answer still hold."""
        budget = write_budget(deadline, self._settings.shard_timeout_s)
        if await self._spaces.lookup(space, budget) is None:
            raise NotFound(
                f"space {space!r} holds nothing: no vector was ever stored in it, or it was dropped"
            )
        dropped, missing = await self.shards.drop_space(space, budget)
        self._spaces.forget(space)
        return dropped, missing
