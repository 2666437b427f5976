"""Index shards behind the gateway: which shard owns an item, and fan-out search, upsert and delete.

An item lives on the shard `jump_hash(blake2b(id)) mod N` over the GATEWAY_INDEX_SHARDS list: stable
across restarts and processes, and growing the list from N to N+1 shards moves only 1/(N+1) of the ids
(which must then be re-upserted; see the README). Searches go to every shard in parallel with one
deadline; the hits of those that answered are merged, the others are reported, not fatal.
"""

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import grpc
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import index_pb2_grpc as idx_grpc
from embeddings.v1 import types_pb2 as pb

from services.common import metrics
from services.common.errors import InvalidArgument, ServiceError, Unavailable
from services.gateway.channels import BackendChannels

log = logging.getLogger("sharding")

T = TypeVar("T")

# What a shard's failure means for the caller: their request was wrong (raise it), or the shard is gone.
_CALLER_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def jump_hash(key: int, buckets: int) -> int:
    """Lamping & Veach's jump consistent hash: a bucket in [0, buckets) for a 64-bit key."""
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * 2862933555777941757 + 1) % (1 << 64)
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def shard_of(item_id: str, shards: int) -> int:
    digest = hashlib.blake2b(item_id.encode(), digest_size=8).digest()
    return jump_hash(int.from_bytes(digest, "little"), shards)


@dataclass
class Merged:
    hits: list[pb.Hit]
    missing: list[str]


class Shard:
    def __init__(self, address: str, channels: BackendChannels) -> None:
        self.address = address
        self.channel = channels.open(address)
        self.index = idx_grpc.IndexStub(self.channel)

    def failed(self, method: str, error: grpc.aio.AioRpcError) -> None:
        metrics.SHARD_FAILURES.labels(self.address, method, error.code().name).inc()
        log.warning("shard %s %s failed: %s %s", self.address, method, error.code().name, error.details())


class ShardSet:
    def __init__(self, addresses: Sequence[str], channels: BackendChannels) -> None:
        self.shards = [Shard(address, channels) for address in addresses]
        self.dimensions: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self, refresh_s: float) -> None:
        """Learn the shards' spaces now, and again every `refresh_s` (shards may be down: not waited for)."""
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever(refresh_s))

    async def _refresh_forever(self, refresh_s: float) -> None:
        while True:
            await asyncio.sleep(refresh_s)
            await self.refresh()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for shard in self.shards:
            await shard.channel.close()

    def _require(self) -> None:
        if not self.shards:
            raise Unavailable("this gateway has no index shards; set GATEWAY_INDEX_SHARDS")

    def owners(self, ids: Sequence[str]) -> dict[int, list[int]]:
        """For each shard number, the positions of the ids it owns."""
        owned: dict[int, list[int]] = {}
        for position, item_id in enumerate(ids):
            owned.setdefault(shard_of(item_id, len(self.shards)), []).append(position)
        return owned

    async def refresh(self, timeout: float = 2.0) -> None:
        """Learn which spaces the shards hold, and their dimensions (to check vectors before fan-out)."""

        async def stats(shard: Shard) -> idx.IndexStatsResponse | None:
            try:
                return await shard.index.Stats(idx.IndexStatsRequest(), timeout=timeout)
            except grpc.aio.AioRpcError:
                return None

        for response in await asyncio.gather(*(stats(shard) for shard in self.shards)):
            if response is not None:
                for space in response.spaces:
                    self.dimensions[space.space] = space.dimension

    async def search(self, request: idx.IndexSearchRequest, timeout: float) -> Merged:
        """The top k over every shard that answered within `timeout`; the others are listed as missing."""
        self._require()

        async def ask(shard: Shard) -> idx.IndexSearchResponse | None:
            try:
                return await shard.index.Search(request, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:  # the shard holds nothing of the space
                    return idx.IndexSearchResponse()
                if error.code() in _CALLER_ERRORS:
                    raise ServiceError(error.details() or "", error.code()) from None
                shard.failed("Search", error)
                return None

        answers = await asyncio.gather(*(ask(shard) for shard in self.shards))
        missing = [
            shard.address for shard, answer in zip(self.shards, answers, strict=True) if answer is None
        ]
        if len(missing) == len(self.shards):
            raise Unavailable(
                f"no index shard answered within {timeout:.1f}s: {', '.join(missing)}; retry shortly"
            )
        best: dict[str, pb.Hit] = {}
        for shard, answer in zip(self.shards, answers, strict=True):
            for hit in answer.hits if answer is not None else ():
                if hit.id not in best or hit.score > best[hit.id].score:
                    hit.shard = shard.address
                    best[hit.id] = hit
        hits = sorted(best.values(), key=lambda hit: (-hit.score, hit.id))[: request.k]
        return Merged(hits, missing)

    async def upsert(
        self, space: str, items: Sequence[idx.IndexItem], request_id: str, timeout: float
    ) -> None:
        """Send each item to its shard, all shards in parallel; fails naming the shards that did not store."""
        self._require()
        owned = self.owners([item.id for item in items])

        async def send(number: int, positions: list[int]) -> None:
            shard = self.shards[number]
            request = idx.IndexUpsertRequest(
                space=space, items=[items[p] for p in positions], request_id=request_id
            )
            try:
                await shard.index.Upsert(request, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                raise self._shard_error(shard, "Upsert", error) from None

        await _all(send(number, positions) for number, positions in owned.items())
        if items:
            self.dimensions.setdefault(space, items[0].vector.dim)

    async def delete(self, space: str, ids: Sequence[str], timeout: float) -> tuple[int, int]:
        """(deleted, not found) over the shards owning `ids`."""
        self._require()
        owned = self.owners(ids)

        async def send(number: int, positions: list[int]) -> idx.IndexDeleteResponse:
            shard = self.shards[number]
            try:
                return await shard.index.Delete(
                    idx.IndexDeleteRequest(space=space, ids=[ids[p] for p in positions]), timeout=timeout
                )
            except grpc.aio.AioRpcError as error:
                raise self._shard_error(shard, "Delete", error) from None

        answers = await _all(send(number, positions) for number, positions in owned.items())
        return sum(answer.deleted for answer in answers), sum(answer.not_found for answer in answers)

    @staticmethod
    def _shard_error(shard: Shard, method: str, error: grpc.aio.AioRpcError) -> ServiceError:
        if error.code() in _CALLER_ERRORS:
            return ServiceError(error.details() or "", error.code())
        shard.failed(method, error)
        return Unavailable(
            f"index shard {shard.address} did not complete {method} ({error.code().name}: {error.details()}); "
            "items on other shards were applied; the request is safe to retry as it is"
        )


async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Run the calls to completion (so no shard is left half-way) and raise the first failure."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)


def invalid_space(space: str, known: Sequence[str]) -> InvalidArgument:
    return InvalidArgument(
        f"space {space!r} is unknown: no model writes into it and no shard holds it; spaces: "
        f"{', '.join(sorted(known)) or 'none'}"
    )
