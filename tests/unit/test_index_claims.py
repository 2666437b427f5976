"""A space has one dimension everywhere: its home shard's claim decides it once, a dropped space's next
claim is its next generation, and a shard holding an older generation drops it before it takes the new
one (durably: after a restart too), while a caller with a stale claim is refused, never served."""

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import types_pb2 as pb

from services.common.errors import FailedPrecondition, NotFound
from services.common.vectors import to_wire
from services.index import claims as claims_module
from services.index.claims import Claims
from services.index.damage import Damaged
from services.index.service import IndexService
from services.index.settings import IndexSettings
from services.index.store import IndexStore
from tests.unit.index_data import kill

_CONTEXT: Any = None


def unit(seed: int, dim: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def item(item_id: str, dim: int, seed: int = 0) -> idx.IndexItem:
    return idx.IndexItem(id=item_id, vector=to_wire(unit(seed, dim)), model=pb.ModelRef(id="m", version="1"))


def settings(root: Path) -> IndexSettings:
    return IndexSettings(data_dir=str(root), fsync="always", snapshot_every_ops=5, ann_threshold=0)


async def test_the_first_claim_decides_and_every_later_one_gets_it(tmp_path: Path) -> None:
    claims = Claims(tmp_path)
    claims.load()
    assert claims.lookup("s") is None
    first, second = await asyncio.gather(claims.claim("s", 8), claims.claim("s", 16))
    assert first == second == claims_module.Claim("s", 8, 0)
    assert claims.lookup("s") == first
    again = Claims(tmp_path)  # from the file
    again.load()
    assert again.lookup("s") == first


async def test_a_dropped_space_is_claimed_again_as_its_next_generation(tmp_path: Path) -> None:
    claims = Claims(tmp_path)
    claims.load()
    await claims.claim("s", 8)
    assert await claims.drop("s") == 0
    assert claims.lookup("s") == claims_module.Claim("s", 0, 0)  # dropped: its generation remembered
    with pytest.raises(NotFound):
        await claims.drop("s")
    assert await claims.claim("s", 16) == claims_module.Claim("s", 16, 1)
    reloaded = Claims(tmp_path)
    reloaded.load()
    assert reloaded.lookup("s").epoch == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
async def test_a_damaged_claims_file_is_a_refusal_naming_it(tmp_path: Path, damage: str) -> None:
    claims = Claims(tmp_path)
    await claims.claim("s", 8)
    path = tmp_path / claims_module.FILE
    data = path.read_bytes()
    if damage == "flip":
        data = data[:-2] + bytes([data[-2] ^ 0x04]) + data[-1:]
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = b"nonsense"
    path.write_bytes(data)
    with pytest.raises(Damaged, match=str(path)):
        Claims(tmp_path).load()


@pytest.fixture
async def shard(tmp_path: Path) -> Any:
    store = IndexStore(settings(tmp_path / "index"))
    await store.open()
    yield store, IndexService(store, settings(tmp_path / "index"), "shard")
    await store.close()


async def upsert(service: IndexService, space: str, epoch: int, *items: idx.IndexItem) -> None:
    await service.Upsert(idx.IndexUpsertRequest(space=space, items=items, space_epoch=epoch), _CONTEXT)


async def search(service: IndexService, space: str, epoch: int, query: np.ndarray) -> list[str]:
    request = idx.IndexSearchRequest(space=space, query=to_wire(query), k=10, space_epoch=epoch)
    return [hit.id for hit in (await service.Search(request, _CONTEXT)).hits]


async def test_a_newer_generation_replaces_the_older_durably(tmp_path: Path) -> None:
    root = tmp_path / "index"
    store = IndexStore(settings(root))
    await store.open()
    service = IndexService(store, settings(root), "shard")
    await upsert(service, "s", 0, item("old-a", 8, 1), item("old-b", 8, 2))
    await upsert(service, "s", 1, item("new", 16, 3))  # generation 1, another dimension
    assert await search(service, "s", 1, unit(3, 16)) == ["new"]
    stats = (await service.Stats(idx.IndexStatsRequest(space="s"), _CONTEXT)).spaces
    assert [(entry.dimension, entry.count, entry.epoch) for entry in stats] == [(16, 1, 1)]
    with pytest.raises(FailedPrecondition, match="stale"):  # a caller still on generation 0
        await upsert(service, "s", 0, item("late", 8, 4))
    with pytest.raises(FailedPrecondition, match="stale"):
        await search(service, "s", 0, unit(1, 8))
    await kill(store)  # the next start replays the log (with snapshots every 5 ops, both)
    restarted = IndexStore(settings(root))
    await restarted.open()
    try:
        again = IndexService(restarted, settings(root), "shard")
        assert await search(again, "s", 1, unit(3, 16)) == ["new"]
        assert restarted.held_epoch("s") == 1 and restarted.dimension("s") == 16
    finally:
        await restarted.close()


async def test_concurrent_writes_of_a_new_generation_keep_each_other(shard: Any) -> None:
    """Both see the older generation and both log a change to the new one: the second change must not drop
    what the first write stored."""
    store, service = shard
    await upsert(service, "s", 0, item("old", 8))
    await asyncio.gather(*(upsert(service, "s", 2, item(f"n{n}", 8, n)) for n in range(6)))
    assert sorted(store.spaces["s"].row_of) == [f"n{n}" for n in range(6)]


async def test_a_search_of_a_newer_generation_finds_nothing_older(shard: Any) -> None:
    store, service = shard
    await upsert(service, "s", 0, item("old", 8, 1))
    assert await search(service, "s", 3, unit(1, 8)) == []  # dropped elsewhere; this shard missed the drop
    assert store.spaces["s"].live == 1  # until its next write of the new generation
    await upsert(service, "s", 3, item("new", 8, 2))
    assert sorted(store.spaces["s"].row_of) == ["new"]


async def test_drop_space_on_the_home_shard_and_on_the_others(shard: Any) -> None:
    store, service = shard
    claim = await service.ClaimSpace(idx.ClaimSpaceRequest(space="s", dimension=8), _CONTEXT)
    assert (claim.dimension, claim.epoch) == (8, 0)
    assert (await service.ClaimSpace(idx.ClaimSpaceRequest(space="s", dimension=4), _CONTEXT)).dimension == 8
    await upsert(service, "s", 0, item("a", 8, 1), item("b", 8, 2))
    dropped = await service.DropSpace(idx.IndexDropSpaceRequest(space="s", claim=True), _CONTEXT)
    assert (dropped.dropped, dropped.epoch) == (2, 0)
    assert "s" not in store.spaces
    assert (await service.LookupSpace(idx.LookupSpaceRequest(space="s"), _CONTEXT)).dimension == 0
    with pytest.raises(NotFound):
        await service.LookupSpace(idx.LookupSpaceRequest(space="never"), _CONTEXT)
    renewed = await service.ClaimSpace(idx.ClaimSpaceRequest(space="s", dimension=4), _CONTEXT)
    assert (renewed.dimension, renewed.epoch) == (4, 1)
    await upsert(service, "s", 1, item("c", 4, 3))
    # a drop of an older generation (another shard's home relaying it late) leaves the newer one alone
    late = await service.DropSpace(idx.IndexDropSpaceRequest(space="s", epoch=0), _CONTEXT)
    assert late.dropped == 0 and sorted(store.spaces["s"].row_of) == ["c"]


async def test_verify_names_a_damaged_claims_file_and_salvage_sets_it_aside(tmp_path: Path) -> None:
    from services.index import salvage, verify

    root = tmp_path / "index"
    store = IndexStore(settings(root))
    await store.open()
    service = IndexService(store, settings(root), "shard")
    await service.ClaimSpace(idx.ClaimSpaceRequest(space="s", dimension=8), _CONTEXT)
    await upsert(service, "s", 0, item("a", 8, 1))
    await store.close()
    path = root / claims_module.FILE
    path.write_bytes(path.read_bytes()[:-3])

    verdict = verify.verify(root)
    assert not verdict.clean and verdict.starts_from is None
    assert any(problem.path == path for problem in verdict.problems)
    with pytest.raises(Damaged, match="CLAIMS"):
        await IndexStore(settings(root)).open()

    salvaged = salvage.salvage(root)
    assert any(loss.path == path for loss in salvaged.lost)
    assert (root / f"{claims_module.FILE}.damaged").exists()
    restarted = IndexStore(settings(root))
    await restarted.open()
    try:  # the items are all there; the space is claimed again by its next writer
        assert sorted(restarted.spaces["s"].row_of) == ["a"]
        assert restarted.claims.lookup("s") is None
    finally:
        await restarted.close()
