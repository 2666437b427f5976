"""Index shards behind the gateway: which shard owns an item, and fan-out search, upsert and delete.

An item lives on the shard `jump_hash(blake2b(id)) mod N` over the GATEWAY_INDEX_SHARDS list: stable
across restarts and processes, and growing the list from N to N+1 shards moves only 1/(N+1) of the ids
(which must then be re-upserted; see the README). Searches go to every shard in parallel with one
deadline; the hits of those that answered are merged, the others are reported, not fatal.

With GATEWAY_INDEX_SHARDS_SRV the list is GATEWAY_INDEX_SHARD_COUNT slots whose addresses DNS gives
(discovery.py) and may change: a slot DNS has not listed yet is a missing shard, and an address that
changes gets a new channel (the old one is closed once its calls are done).
"""

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar, cast

import grpc
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import index_pb2_grpc as idx_grpc
from embeddings.v1 import types_pb2 as pb

from services.common.errors import ServiceError, Unavailable
from services.gateway import metrics
from services.gateway.channels import BackendChannels
from services.gateway.discovery import DiscoveryError, SrvDiscovery
from services.gateway.index_backend import Merged
from services.gateway.relaying import relayed

log = logging.getLogger("sharding")

T = TypeVar("T")

# What a shard's failure means for the caller: their request was wrong, or the space's claim they wrote
# under is stale (raise it), or the shard is gone.
_CALLER_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
# How long the channel of a shard whose address changed stays open for the calls already on it.
_RETIRE_GRACE_S = 10.0


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


def home_of(space: str, shards: int) -> int:
    """The shard that holds `space`'s claim (its dimension and generation): its name hashed as ids are,
    behind a prefix no item id needs to share."""
    return shard_of(f"\0space\0{space}", shards)


class Shard:
    def __init__(self, address: str, channels: BackendChannels) -> None:
        self.address = address
        self.channel = channels.open(address)
        self.index = idx_grpc.IndexStub(self.channel)

    def failed(self, method: str, error: grpc.aio.AioRpcError) -> None:
        metrics.SHARD_FAILURES.labels(self.address, method, error.code().name).inc()
        log.warning("shard %s %s failed: %s %s", self.address, method, error.code().name, error.details())


class ShardSet:
    def __init__(
        self, addresses: Sequence[str], channels: BackendChannels, discovery: SrvDiscovery | None = None
    ) -> None:
        """Shards at the fixed `addresses`, or (with `discovery`, and no `addresses`) `discovery.count`
        shards whose addresses DNS gives: None until it does."""
        if discovery is not None and addresses:
            raise ValueError("shards come from a list of addresses or from DNS discovery, not both")
        self._channels = channels
        self._discovery = discovery
        self.shards: list[Shard | None] = (
            [Shard(address, channels) for address in addresses]
            if discovery is None
            else [None] * discovery.count
        )
        # What the shards' Stats said they hold of each space: (dimension, newest generation).
        self.held: dict[str, tuple[int, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._retiring: set[asyncio.Task[None]] = set()
        self._dns_failing = False
        self._unlisted: set[int] = set()

    async def start(self, refresh_s: float, discovery_s: float = 10.0) -> None:
        """Learn the shards' spaces now, and again every `refresh_s` (shards may be down: not waited for);
        with discovery, first the shards' addresses, and again every `discovery_s` (DNS may list none yet:
        then every shard is missing until it does)."""
        loop = asyncio.get_running_loop()
        if self._discovery is not None:
            await self._discover()
            self._tasks.append(loop.create_task(self._every(discovery_s, self.discover)))
        await self.refresh()
        self._tasks.append(loop.create_task(self._every(refresh_s, self.refresh)))

    @staticmethod
    async def _every(period_s: float, call: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await call()
            except Exception:  # a bug must not end the loop: the gateway would keep stale shards for good
                log.exception("periodic shard task failed")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for shard in self.shards:
            if shard is not None:
                await shard.channel.close()

    async def discover(self) -> None:
        """Ask DNS for the shards' addresses again; learn the spaces of shards that got a new one."""
        if await self._discover():
            await self.refresh()

    async def _discover(self) -> bool:
        """Take the addresses DNS lists now; a shard it does not list (or a DNS failure) keeps its last
        known address: a StatefulSet pod's name outlives the pod. Whether an address changed."""
        assert self._discovery is not None
        name = self._discovery.name
        try:
            found = await self._discovery.resolve()
        except DiscoveryError as error:
            if not self._dns_failing:
                log.warning(
                    "shard discovery: %s did not resolve (%s); keeping the last known addresses", name, error
                )
            self._dns_failing = True
            return False
        if self._dns_failing:
            log.info("shard discovery: %s resolves again", name)
        self._dns_failing = False
        changed = False
        for number, address in sorted(found.items()):
            current = self.shards[number]
            if current is not None and current.address == address:
                continue
            self.shards[number] = Shard(address, self._channels)
            changed = True
            if current is None:
                log.info("shard %d discovered at %s (%s)", number, address, name)
            else:
                log.warning("shard %d moved from %s to %s (%s)", number, current.address, address, name)
                self._retire(current)
        unlisted = {number for number in range(len(self.shards)) if number not in found}
        if unlisted != self._unlisted and unlisted:
            log.warning(
                "shard discovery: %s does not list shard(s) %s; %s",
                name,
                ", ".join(map(str, sorted(unlisted))),
                "those with a last known address keep it, the others are missing until it lists them",
            )
        self._unlisted = unlisted
        return changed

    def _retire(self, shard: Shard) -> None:
        """Close the channel of a shard's old address once the calls on it are done."""
        task = asyncio.get_running_loop().create_task(shard.channel.close(grace=_RETIRE_GRACE_S))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _name(self, number: int, shard: Shard | None) -> str:
        """How a shard is named in `missing_shards` and errors: its address, or why it has none."""
        if shard is not None:
            return shard.address
        assert self._discovery is not None
        return self._discovery.undiscovered(number)

    def _owning(self, owned: dict[int, list[int]], method: str) -> dict[int, Shard]:
        """The shards owning the positions in `owned`; UNAVAILABLE naming those not discovered yet (and
        then no shard is sent anything)."""
        shards = {number: self.shards[number] for number in owned}
        unknown = [self._name(number, None) for number, shard in sorted(shards.items()) if shard is None]
        if unknown:
            raise Unavailable(
                f"index {', '.join(unknown)} did not complete {method}: "
                f"{'it owns' if len(unknown) == 1 else 'they own'} items of this request and "
                f"{'has' if len(unknown) == 1 else 'have'} no address yet; nothing was applied; the request "
                "is safe to retry as it is"
            )
        return {number: shard for number, shard in shards.items() if shard is not None}

    def _require(self) -> None:
        if not self.shards:
            raise Unavailable("this gateway has no index shards; set GATEWAY_INDEX_SHARDS")

    def home(self, space: str) -> Shard:
        """The shard holding `space`'s claim; UNAVAILABLE when it has no address yet."""
        self._require()
        number = home_of(space, len(self.shards))
        shard = self.shards[number]
        if shard is None:
            raise Unavailable(
                f"index {self._name(number, None)}, the home of space {space!r}, has no address yet"
            )
        return shard

    async def claim(self, space: str, dimension: int, timeout: float) -> idx.SpaceClaim:
        """The space's claim from its home shard, made with `dimension` by this first writer."""
        shard = self.home(space)
        try:
            return await shard.index.ClaimSpace(
                idx.ClaimSpaceRequest(space=space, dimension=dimension), timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            raise self._shard_error(shard, "ClaimSpace", error) from None

    async def lookup(self, space: str, timeout: float) -> idx.SpaceClaim | None:
        """The space's claim from its home shard; None when it has none."""
        shard = self.home(space)
        try:
            return await shard.index.LookupSpace(idx.LookupSpaceRequest(space=space), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self._shard_error(shard, "LookupSpace", error) from None

    async def drop_space(self, space: str, timeout: float) -> tuple[int, list[str]]:
        """Drop the space's claim on its home shard, then its items on every shard: (items dropped, shards
        that did not answer). The claim goes first: once it is gone, no search or write sees the space."""
        home = self.home(space)
        try:
            dropped = await home.index.DropSpace(
                idx.IndexDropSpaceRequest(space=space, claim=True), timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            raise self._shard_error(home, "DropSpace", error) from None
        self.held.pop(space, None)
        shards = [shard for shard in self.shards if shard is not home]

        async def drop(shard: Shard | None) -> idx.IndexDropSpaceResponse | None:
            if shard is None:
                return None
            try:
                return await shard.index.DropSpace(
                    idx.IndexDropSpaceRequest(space=space, epoch=dropped.epoch), timeout=timeout
                )
            except grpc.aio.AioRpcError as error:
                shard.failed("DropSpace", error)
                return None

        answers = await asyncio.gather(*(drop(shard) for shard in shards))
        missing = [
            self._name(self.shards.index(shard), shard)
            for shard, answer in zip(shards, answers, strict=True)
            if answer is None
        ]
        return dropped.dropped + sum(answer.dropped for answer in answers if answer is not None), missing

    def owners(self, ids: Sequence[str]) -> dict[int, list[int]]:
        """For each shard number, the positions of the ids it owns."""
        owned: dict[int, list[int]] = {}
        for position, item_id in enumerate(ids):
            owned.setdefault(shard_of(item_id, len(self.shards)), []).append(position)
        return owned

    async def refresh(self, timeout: float = 2.0) -> None:
        """Learn which spaces the shards hold, in which dimension and generation (what searches fall back on
        while a space's home shard is down, and how spaces held before claims existed are claimed)."""

        async def stats(shard: Shard) -> idx.IndexStatsResponse | None:
            try:
                return await shard.index.Stats(idx.IndexStatsRequest(), timeout=timeout)
            except grpc.aio.AioRpcError:
                return None

        known = [shard for shard in self.shards if shard is not None]
        held: dict[str, tuple[int, int]] = {}
        for response in await asyncio.gather(*(stats(shard) for shard in known)):
            if response is not None:
                for space in response.spaces:
                    if space.space not in held or space.epoch > held[space.space][1]:
                        held[space.space] = (space.dimension, space.epoch)
        self.held.update(held)

    async def search(self, request: idx.IndexSearchRequest, timeout: float) -> Merged:
        """The top k over every shard that answered within `timeout`; the others are listed as missing."""
        self._require()

        shards = list(self.shards)  # this search's view: discovery may replace a shard meanwhile

        async def ask(shard: Shard | None) -> idx.IndexSearchResponse | None:
            if shard is None:  # not discovered yet
                return None
            try:
                return await shard.index.Search(request, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:  # the shard holds nothing of the space
                    return idx.IndexSearchResponse()
                if error.code() in _CALLER_ERRORS:
                    raise relayed(error, f"index shard {shard.address}") from None
                shard.failed("Search", error)
                return None

        answers = await asyncio.gather(*(ask(shard) for shard in shards))
        missing = [
            self._name(number, shard)
            for number, (shard, answer) in enumerate(zip(shards, answers, strict=True))
            if answer is None
        ]
        if all(shard is None for shard in shards):
            raise Unavailable(f"no index shard is discovered yet: {', '.join(missing)}; retry shortly")
        if len(missing) == len(shards):
            raise Unavailable(
                f"no index shard answered within {timeout:.1f}s: {', '.join(missing)}; retry shortly"
            )
        best: dict[str, pb.Hit] = {}
        for shard, answer in zip(shards, answers, strict=True):
            if shard is None or answer is None:
                continue
            for hit in answer.hits:
                if hit.id not in best or hit.score > best[hit.id].score:
                    hit.shard = shard.address
                    best[hit.id] = hit
        hits = sorted(best.values(), key=lambda hit: (-hit.score, hit.id))[: request.k]
        return Merged(hits, missing)

    async def upsert(
        self, space: str, items: Sequence[idx.IndexItem], request_id: str, timeout: float, epoch: int
    ) -> None:
        """Send each item to its shard, all shards in parallel; fails naming the shards that did not store."""
        self._require()
        owned = self.owners([item.id for item in items])
        shards = self._owning(owned, "Upsert")

        async def send(number: int, positions: list[int]) -> None:
            shard = shards[number]
            request = idx.IndexUpsertRequest(
                space=space, items=[items[p] for p in positions], request_id=request_id, space_epoch=epoch
            )
            try:
                await shard.index.Upsert(request, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                raise self._shard_error(shard, "Upsert", error).moved("items", positions, "items") from None

        await _all(send(number, positions) for number, positions in owned.items())
        if items:
            self.held.setdefault(space, (items[0].vector.dim, epoch))

    async def delete(self, space: str, ids: Sequence[str], timeout: float, epoch: int) -> tuple[int, int]:
        """(deleted, not found) over the shards owning `ids`."""
        self._require()
        owned = self.owners(ids)
        shards = self._owning(owned, "Delete")

        async def send(number: int, positions: list[int]) -> idx.IndexDeleteResponse:
            shard = shards[number]
            try:
                return await shard.index.Delete(
                    idx.IndexDeleteRequest(space=space, ids=[ids[p] for p in positions], space_epoch=epoch),
                    timeout=timeout,
                )
            except grpc.aio.AioRpcError as error:
                raise self._shard_error(shard, "Delete", error).moved("ids", positions, "ids") from None

        answers = await _all(send(number, positions) for number, positions in owned.items())
        return sum(answer.deleted for answer in answers), sum(answer.not_found for answer in answers)

    @staticmethod
    def _shard_error(shard: Shard, method: str, error: grpc.aio.AioRpcError) -> ServiceError:
        """A shard's failure as the caller's error. Only the item writes (Upsert, Delete) go to several
        shards at once, so only they can have been applied elsewhere; the space calls come first, alone."""
        if error.code() in _CALLER_ERRORS:
            return relayed(error, f"index shard {shard.address}")
        shard.failed(method, error)
        applied = "items on other shards were applied" if method in _ITEM_WRITES else "nothing was applied"
        return Unavailable(
            f"index shard {shard.address} did not complete {method} ({error.code().name}: {error.details()}); "
            f"{applied}; the request is safe to retry as it is"
        )


_ITEM_WRITES = frozenset({"Upsert", "Delete"})


async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Run the calls to completion (so no shard is left half-way) and raise the first failure."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)
