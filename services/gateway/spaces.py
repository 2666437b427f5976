"""What the gateway knows of the spaces' claims (services/index/claims.py): each space's dimension and
generation, decided by its home shard.

A write claims its space every time (the home shard answers the claim in force, or makes it): two gateways
or two calls can never give a space two dimensions. Searches and deletes look the claim up, and remember
it for GATEWAY_SPACE_CLAIM_TTL_S; a shard that holds a newer generation than a remembered claim refuses
the call as stale, and the caller looks the claim up again and retries once.
"""

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from services.common.errors import FailedPrecondition, Unavailable
from services.gateway.sharding import ShardSet

T = TypeVar("T")


@dataclass(frozen=True)
class Claim:
    dimension: int
    epoch: int


class SpaceClaims:
    def __init__(self, shards: ShardSet, ttl_s: float) -> None:
        self._shards = shards
        self._ttl_s = ttl_s
        self._known: dict[str, tuple[Claim, float]] = {}

    async def claim(self, space: str, dimension: int, timeout: float) -> Claim:
        """The space's claim, made with `dimension` if the space has none (else the one in force)."""
        answer = await self._shards.claim(space, dimension, timeout)
        return self._remember(space, Claim(answer.dimension, answer.epoch))

    async def lookup(self, space: str, timeout: float) -> Claim | None:
        """The space's claim (remembered for the TTL); None when it has none. A space the shards held before
        claims existed is claimed now, at generation 0, with the dimension they hold it in. While the home
        shard is unavailable, reads go on with the claim last known, or with what the shards hold."""
        known = self._known.get(space)
        if known is not None and time.monotonic() < known[1]:
            return known[0]
        try:
            answer = await self._shards.lookup(space, timeout)
        except Unavailable:
            held = self._shards.held.get(space)
            if known is not None:
                return known[0]
            if held is not None:
                return Claim(*held)
            raise
        if answer is None:  # never claimed: held before claims existed (generation 0), or nowhere
            held = self._shards.held.get(space)
            return None if held is None or held[1] else await self.claim(space, held[0], timeout)
        if not answer.dimension:  # dropped
            self.forget(space)
            return None
        return self._remember(space, Claim(answer.dimension, answer.epoch))

    def forget(self, space: str) -> None:
        self._known.pop(space, None)

    async def retrying(self, space: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, once more after the claim is forgotten if a shard found it stale."""
        try:
            return await call()
        except FailedPrecondition:
            self.forget(space)
            return await call()

    def _remember(self, space: str, claim: Claim) -> Claim:
        self._known[space] = (claim, time.monotonic() + self._ttl_s)
        return claim
