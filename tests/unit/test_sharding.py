"""Which shard owns an item: stable, balanced, and moving few ids when a shard is added."""

import grpc
import pytest

from services.gateway.sharding import ShardSet, jump_hash, shard_of


def test_an_id_always_maps_to_the_same_shard() -> None:
    # Pinned: a change here would strand every indexed item on a shard that no longer owns it.
    assert [shard_of(f"item-{n}", 4) for n in range(8)] == [2, 2, 2, 1, 3, 2, 3, 3]
    assert [jump_hash(key, 10) for key in (0, 1, 2**40, 2**63)] == [0, 6, 9, 5]
    assert {jump_hash(key, 1) for key in range(100)} == {0}


def test_ids_spread_evenly_over_the_shards() -> None:
    counts = [0] * 4
    for n in range(40_000):
        counts[shard_of(f"doc-{n}", 4)] += 1
    assert all(9_400 < count < 10_600 for count in counts), counts


def test_adding_a_shard_moves_only_its_share_of_the_ids() -> None:
    ids = [f"user-{n}" for n in range(20_000)]
    moved = [item for item in ids if shard_of(item, 4) != shard_of(item, 5)]
    assert all(shard_of(item, 5) == 4 for item in moved), "ids may only move to the new shard"
    assert 0.17 < len(moved) / len(ids) < 0.23  # about 1/5


def _reference_placements(ids: list[str], buckets: int) -> list[int]:
    """Lamping & Veach's published algorithm (the paper's C code: 64-bit wrapping arithmetic, a double
    division), run on numpy uint64 arrays over every id at once, on the first 8 bytes of blake2b as a
    little-endian integer: written apart from the product's code, to check it against."""
    import hashlib

    import numpy as np

    keys = np.array(
        [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids],
        dtype=np.uint64,
    )
    bucket = np.full(len(ids), -1, dtype=np.int64)
    candidate = np.zeros(len(ids), dtype=np.int64)
    with np.errstate(over="ignore"):
        while (active := candidate < buckets).any():
            bucket[active] = candidate[active]
            keys[active] = keys[active] * np.uint64(2862933555777941757) + np.uint64(1)
            shifted = (keys[active] >> np.uint64(33)).astype(np.float64) + 1.0
            candidate[active] = ((bucket[active] + 1) * (float(1 << 31) / shifted)).astype(np.int64)
    return bucket.tolist()


def test_placements_match_an_independent_jump_hash_over_blake2b() -> None:
    ids = [f"item-{n}" for n in range(3000)] + ["", "é", "x" * 512, "space\0id"]
    for buckets in (1, 2, 3, 4, 7, 10, 64):
        assert [shard_of(item, buckets) for item in ids] == _reference_placements(ids, buckets), buckets


class _FailingShard:
    address = "10.0.0.7:50061"

    def failed(self, method: str, error: object) -> None:
        """What the shard set counts; nothing to count here."""


@pytest.mark.parametrize(
    ("method", "says"),
    [
        ("Upsert", "items on other shards were applied"),
        ("Delete", "items on other shards were applied"),
        ("LookupSpace", "nothing was applied"),
        ("ClaimSpace", "nothing was applied"),
        ("DropSpace", "nothing was applied"),
    ],
)
def test_a_shard_failure_says_what_was_applied(method: str, says: str) -> None:
    """Only the item writes go to several shards at once; the space calls come first, alone."""
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
    )
    refused = ShardSet._shard_error(_FailingShard(), method, error)  # type: ignore[arg-type]
    assert refused.code == grpc.StatusCode.UNAVAILABLE
    assert (
        f"index shard 10.0.0.7:50061 did not complete {method} (UNAVAILABLE: down); {says};"
        in refused.message
    )
