"""What the gateway's index calls need from an index, whichever holds the items: the built-in shards
(shard_backend.py) or Milvus (milvus/). indexing.py encodes and checks, then hands each call to one of them.

Both keep the same rules: a space has one dimension, decided by its first write and checked on every later
one; a space that was dropped is gone for every search and write at once; a search of a space nothing was
ever stored in finds nothing (None: the caller decides whether the space is known at all).
"""

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument


@dataclass
class Merged:
    """A search's hits, best first, and the parts of the index that did not answer (the shards missing)."""

    hits: list[pb.Hit]
    missing: list[str]


class IndexBackend(Protocol):
    async def start(self) -> None:
        """Learn what the index holds, as far as it answers now (a backend that is down is not waited for)."""

    async def close(self) -> None: ...

    async def search(
        self, space: str, query: np.ndarray, k: int, filter: pb.SearchFilter, field: str, deadline: float
    ) -> Merged | None:
        """The top k of `space` for the unit vector `query` (INVALID_ARGUMENT naming `field` when its
        dimension is not the space's); None when nothing was ever stored in the space (or it was dropped)."""
        ...

    async def upsert(
        self,
        space: str,
        items: Sequence[idx.IndexItem],
        dimension: tuple[str, int],
        request_id: str,
        deadline: float,
    ) -> None:
        """Store the items (replacing by id; the last of duplicate ids wins), acknowledged once the index
        has them. `dimension`: (the field it comes from, the items' dimension), which a new space takes and
        an existing one must hold."""
        ...

    async def delete(self, space: str, ids: Sequence[str], deadline: float) -> tuple[int, int]:
        """(deleted, not found)."""
        ...

    async def drop_space(self, space: str, deadline: float) -> tuple[int, list[str]]:
        """Drop the space and its items: (items dropped, parts of the index that did not answer). NOT_FOUND
        when nothing was ever stored in it, or it was dropped."""
        ...


def search_budget(deadline: float, limit_s: float) -> float:
    """How long a search waits for the index: GATEWAY_SHARD_TIMEOUT_S, or less when the caller's deadline is
    sooner, keeping a reserve so that an index that misses it is reported (missing shards, or UNAVAILABLE
    naming Milvus) rather than taking the whole call past the caller's deadline."""
    remaining = deadline - time.monotonic()
    return max(0.0, min(limit_s, remaining - max(0.02, 0.1 * remaining)))


def write_budget(deadline: float, limit_s: float) -> float:
    """How long a write (or a delete, or a drop) may take: GATEWAY_SHARD_TIMEOUT_S, or the caller's time left."""
    return max(0.0, min(limit_s, deadline - time.monotonic()))


def check_dimension(dimension: int, held: int | None, space: str, field: str) -> None:
    """Vectors of `dimension` fit a space holding `held`-dimensional ones (None: not known yet)."""
    if held is not None and dimension != held:
        raise InvalidArgument(
            f"has {dimension} dimensions but space {space!r} holds {held}-dimensional vectors", field=field
        )


def invalid_space(space: str, model_spaces: Iterable[str]) -> InvalidArgument:
    """An unknown space; the message lists only the spaces models write into (what ListModels shows
    anyway), never the spaces other callers made of their own vectors."""
    return InvalidArgument(
        f"space {space!r} is unknown: no model writes into it and nothing is stored in it; the models' spaces "
        f"are {', '.join(sorted(model_spaces)) or 'none'} (a space of your own vectors exists once you upsert "
        "into it)"
    )
