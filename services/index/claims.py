"""The claims of the spaces whose home this shard is: each space's dimension and generation, decided once.

A space's home is the shard its name hashes to (the gateway computes it). The first writer of a new
space claims it there with its vectors' dimension; every later claim, from any gateway, gets the same
answer, so two writers can never give one space two dimensions on different shards. Dropping a space
removes its claim and remembers its generation: a space claimed again is its next generation (`epoch`),
and the shards drop whatever they still hold of older ones.

Claims are few and rare, so they live in one small file, `CLAIMS` (its sha256, then JSON), rewritten whole
(written, fsync'd, renamed) on every change, and verified on load: a damaged file is a refusal to start
naming it, never a silent loss of claims.
"""

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from services.common.durable import fsync_dir, write_synced
from services.common.errors import NotFound
from services.index.damage import Damaged, Problem

FILE = "CLAIMS"


@dataclass(frozen=True)
class Claim:
    space: str
    dimension: int  # 0: dropped (the space is free; its next claim is generation epoch + 1)
    epoch: int


class Claims:
    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / FILE
        self._claims: dict[str, Claim] = {}
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """Read the file (none yet: no claims); Damaged naming it when it does not check out."""
        if not self._path.exists():
            return
        data = self._path.read_bytes()
        digest, _, text = data.partition(b"\n")
        try:
            if hashlib.sha256(text).hexdigest().encode() != digest:
                raise ValueError("checksum mismatch")
            entries = json.loads(text)
            self._claims = {
                entry["space"]: Claim(entry["space"], int(entry["dimension"]), int(entry["epoch"]))
                for entry in entries
            }
        except (ValueError, KeyError, TypeError) as error:
            raise Damaged(
                self._path.parent, [Problem(self._path, 0, f"claims file unreadable ({error})")]
            ) from None

    def lookup(self, space: str) -> Claim | None:
        """The space's claim (dimension 0: dropped); None when it was never claimed."""
        return self._claims.get(space)

    async def claim(self, space: str, dimension: int) -> Claim:
        """The space's claim, made now with `dimension` when it has none (when it has one, of whatever
        dimension, that one: the caller refuses vectors that do not fit it, naming them)."""
        async with self._lock:
            claim = self._claims.get(space)
            if claim is not None and claim.dimension:
                return claim
            made = Claim(space, dimension, 0 if claim is None else claim.epoch + 1)
            await self._save({**self._claims, space: made})
            return made

    async def drop(self, space: str) -> int:
        """Free the space; returns the generation dropped (NOT_FOUND when it has no claim)."""
        async with self._lock:
            claim = self._claims.get(space)
            if claim is None or not claim.dimension:
                raise NotFound(
                    f"space {space!r} is not claimed: no vector was ever stored in it, or it was dropped"
                )
            await self._save({**self._claims, space: Claim(space, 0, claim.epoch)})
            return claim.epoch

    async def _save(self, claims: dict[str, Claim]) -> None:
        """Write `claims` durably, then make them the ones in force (a failed write changes nothing)."""
        entries = [{"space": c.space, "dimension": c.dimension, "epoch": c.epoch} for c in claims.values()]
        text = json.dumps(entries).encode()
        await asyncio.to_thread(self._write, hashlib.sha256(text).hexdigest().encode() + b"\n" + text)
        self._claims = claims

    def _write(self, data: bytes) -> None:
        temporary = self._path.with_name(f".{FILE}.tmp")
        write_synced(temporary, data)
        os.replace(temporary, self._path)
        fsync_dir(self._path.parent)
