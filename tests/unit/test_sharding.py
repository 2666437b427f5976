"""Which shard owns an item: stable, balanced, and moving few ids when a shard is added."""

from services.gateway.sharding import jump_hash, shard_of


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
