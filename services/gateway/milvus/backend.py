"""The gateway's index on Milvus: one collection per space (schema.py), made by the space's first write.

The space rules hold as on the shards, with Milvus as the one place that decides: the collection's vector
field fixes the space's dimension (a write always asks Milvus for it, and creates the collection with its
own when there is none: of two writers racing to create a space, Milvus accepts one schema and the other
writer gets INVALID_ARGUMENT naming the winner's dimension); DropSpace drops the collection, gone for every
gateway at once; a search or delete remembers a space's dimension for GATEWAY_SPACE_CLAIM_TTL_S, and looks
again when Milvus says the collection changed.

Milvus answers a search whole or not at all: one that fails or misses its deadline is UNAVAILABLE naming
Milvus, never `partial` (Milvus spreads a collection over its own shards and replicas itself).
"""

import json
import logging
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import types_pb2 as pb
from pymilvus import MilvusClient
from pymilvus.client.types import LoadState

from services.common.errors import NotFound, ServiceError, Unavailable
from services.gateway.index_backend import Merged, check_dimension, search_budget, write_budget
from services.gateway.milvus.calls import Gone, Job, MilvusCalls, NotReady, Refused
from services.gateway.milvus.filters import id_token, ids_expression, search_expression
from services.gateway.milvus.schema import (
    OUTPUT_FIELDS,
    VECTOR,
    collection_name,
    dimension_of,
    index_params,
    rows,
    schema,
)
from services.gateway.settings import GatewaySettings

log = logging.getLogger("milvus")

T = TypeVar("T")


class MilvusBackend:
    def __init__(self, settings: GatewaySettings, token: str) -> None:
        self._settings = settings
        self._calls = MilvusCalls(settings, token)
        self._known: dict[str, tuple[int, float]] = {}  # space -> (dimension, remembered until)
        self._ready: set[str] = set()  # collections seen with their index, loaded
        self._index_params = json.loads(settings.milvus_index_params)
        self._search_params = {"metric_type": "IP", "params": json.loads(settings.milvus_search_params)}
        self._consistency = settings.milvus_consistency_level

    async def start(self) -> None:
        try:
            await self._calls.connect(time.monotonic() + self._settings.shard_timeout_s)
        except ServiceError as error:
            log.warning("%s; the index calls will try again", error.message)

    async def close(self) -> None:
        self._calls.close()

    def _collection(self, space: str) -> str:
        return collection_name(self._settings.milvus_collection_prefix, space)

    def _forget(self, space: str) -> None:
        self._known.pop(space, None)
        self._ready.discard(self._collection(space))

    async def _dimension(self, space: str, deadline: float, fresh: bool = False) -> int | None:
        """The space's dimension (remembered, unless `fresh`); None when it has no collection."""
        known = self._known.get(space)
        if not fresh and known is not None and time.monotonic() < known[1]:
            return known[0]
        name = self._collection(space)

        def describe(client: MilvusClient, remaining: Any) -> int:
            return dimension_of(client.describe_collection(name, timeout=remaining(), retry_times=0))

        try:
            dimension = await self._calls.call("describe_collection", deadline, describe)
        except Gone:
            self._forget(space)
            return None
        self._known[space] = (dimension, time.monotonic() + self._settings.space_claim_ttl_s)
        return dimension

    async def _claim(self, space: str, dimension: int, deadline: float) -> int:
        """The dimension of the space's collection, made now with `dimension` if there is none."""
        held = await self._dimension(space, deadline, fresh=True)
        if held is not None:
            return held
        name, settings = self._collection(space), self._settings
        made = schema(space, dimension, settings.max_id_bytes, settings.max_payload_bytes)

        def create(client: MilvusClient, remaining: Any) -> None:
            client.create_collection(
                name,
                schema=made,
                consistency_level=self._consistency,
                num_shards=settings.milvus_shards,
                timeout=remaining(),
                retry_times=0,
            )

        try:
            await self._calls.call("create_collection", deadline, create)
        except Refused:  # another writer made it first, with another dimension: its schema holds
            held = await self._dimension(space, deadline, fresh=True)
            if held is None:
                raise
            return held
        await self._calls.call("preparing the collection", deadline, self._prepare(name))
        self._ready.add(name)  # its index built and loaded now, by its maker, rather than by the first search
        return await self._dimension(space, deadline, fresh=True) or dimension

    async def _on_collection(self, space: str, what: str, deadline: float, job: Job[T]) -> T:
        """`job` on the space's collection, first giving it its index and loading it if this gateway has not
        seen it so (another gateway may have made it a moment ago, or Milvus restarted). Raises Gone."""
        name = self._collection(space)
        for attempt in (1, 2):
            if name not in self._ready:
                await self._calls.call("preparing the collection", deadline, self._prepare(name))
                self._ready.add(name)
            try:
                return await self._calls.call(what, deadline, job)
            except NotReady:
                self._ready.discard(name)
                if attempt == 2:
                    raise Unavailable(
                        f"{self._calls.name}: the collection of space {space!r} is not loaded; retry shortly"
                    ) from None
        raise AssertionError("unreachable")

    def _prepare(self, name: str) -> Job[None]:
        settings = self._settings

        def prepare(client: MilvusClient, remaining: Any) -> None:
            if not client.list_indexes(name, timeout=remaining(), retry_times=0):
                params = index_params(client, settings.milvus_index_type, self._index_params)
                client.create_index(name, params, timeout=remaining(), retry_times=0)
            state = client.get_load_state(name, timeout=remaining(), retry_times=0)
            if state["state"] != LoadState.Loaded:
                client.load_collection(
                    name, replica_number=settings.milvus_replicas, timeout=remaining(), retry_times=0
                )

        return prepare

    async def search(
        self, space: str, query: np.ndarray, k: int, filter: pb.SearchFilter, field: str, deadline: float
    ) -> Merged | None:
        until = time.monotonic() + search_budget(deadline, self._settings.shard_timeout_s)
        name, expression, vector = self._collection(space), search_expression(filter), query.tolist()

        def search(client: MilvusClient, remaining: Any) -> list[Any]:
            found = client.search(
                name,
                data=[vector],
                limit=k,
                filter=expression,
                output_fields=OUTPUT_FIELDS,
                search_params=self._search_params,
                anns_field=VECTOR,
                consistency_level=self._consistency,
                timeout=remaining(),
                retry_times=0,
            )
            return list(found[0])

        for attempt in (1, 2):  # the second time with what Milvus holds now, not what was remembered
            held = await self._dimension(space, until, fresh=attempt == 2)
            if held is None:
                return None
            check_dimension(query.shape[0], held, space, field)
            try:
                found = await self._on_collection(space, "search", until, search)
            except (Gone, Refused):  # dropped, or made again with another dimension, since remembered
                self._forget(space)
                if attempt == 2:
                    raise
                continue
            hits = [
                pb.Hit(
                    id=hit["id"],
                    score=float(hit["distance"]),
                    kind=int(hit["entity"]["kind"]),
                    payload_json=hit["entity"]["payload"],
                    shard=self._calls.address,
                )
                for hit in found
            ]
            return Merged(sorted(hits, key=lambda hit: (-hit.score, hit.id))[:k], [])
        raise AssertionError("unreachable")

    async def upsert(
        self,
        space: str,
        items: Sequence[idx.IndexItem],
        dimension: tuple[str, int],
        request_id: str,
        deadline: float,
    ) -> None:
        until = time.monotonic() + write_budget(deadline, self._settings.shard_timeout_s)
        field, size = dimension
        made, name = rows(items), self._collection(space)

        def upsert(client: MilvusClient, remaining: Any) -> None:
            client.upsert(name, made, timeout=remaining(), retry_times=0)

        for attempt in (1, 2):
            held = await self._claim(space, size, until)
            check_dimension(size, held, space, field)
            try:
                await self._calls.call("upsert", until, upsert)
                return
            except Gone:  # dropped since it was asked for: the write makes the space again
                self._forget(space)
                if attempt == 2:
                    raise Unavailable(
                        f"space {space!r} was dropped while this write ran; nothing was applied, retry it"
                    ) from None

    async def delete(self, space: str, ids: Sequence[str], deadline: float) -> tuple[int, int]:
        until = time.monotonic() + write_budget(deadline, self._settings.shard_timeout_s)
        keys = sorted({id_token(item_id) for item_id in ids})

        def delete(client: MilvusClient, remaining: Any) -> int:
            # counted, not listed: Milvus Lite fails a query whose answer is empty ("Unsupported data type")
            present = _count(
                client, self._collection(space), ids_expression(keys), self._consistency, remaining
            )
            if present:
                client.delete(
                    self._collection(space), filter=ids_expression(keys), timeout=remaining(), retry_times=0
                )
            return present

        if await self._dimension(space, until) is None:
            return 0, len(keys)
        try:
            deleted = await self._on_collection(space, "delete", until, delete)
        except Gone:
            self._forget(space)
            return 0, len(keys)
        return deleted, len(keys) - deleted

    async def drop_space(self, space: str, deadline: float) -> tuple[int, list[str]]:
        until = time.monotonic() + write_budget(deadline, self._settings.shard_timeout_s)
        name = self._collection(space)

        def drop(client: MilvusClient, remaining: Any) -> int:
            counted = _count(client, name, "", self._consistency, remaining)
            client.drop_collection(name, timeout=remaining(), retry_times=0)
            return counted

        try:
            if await self._dimension(space, until, fresh=True) is None:
                raise Gone
            dropped = await self._on_collection(space, "drop_collection", until, drop)
        except Gone:
            raise NotFound(
                f"space {space!r} holds nothing: no vector was ever stored in it, or it was dropped"
            ) from None
        finally:
            self._forget(space)
        return dropped, []


def _count(client: MilvusClient, name: str, expression: str, consistency: str, remaining: Any) -> int:
    """The items of collection `name` that `expression` keeps ("": all)."""
    counted = client.query(
        name,
        filter=expression,
        output_fields=["count(*)"],
        consistency_level=consistency,
        timeout=remaining(),
        retry_times=0,
    )
    return int(counted[0]["count(*)"])
