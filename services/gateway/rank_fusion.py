"""Several ranked lists of hits made into one: reciprocal rank fusion (a fused search over every space, and
HybridSearch's RRF mix) or a weighted sum of min-max normalised scores (HybridSearch's WEIGHTED mix).

Reciprocal rank fusion (Cormack, Clarke and Buettcher, 2009): a hit ranked r (from 1) in a list of weight w
adds w / (K + r); its fused score is the sum over the lists it is in. It needs no comparable scores: a
cosine in MiniLM's space and one in a CLIP space are on different scales, and a user-item dot product on
none at all. One id is one hit, however many lists hold it; its `sources` say which, with its rank and
score in each, and its kind, payload and shard are those of its best-ranked source.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from embeddings.v1 import types_pb2 as pb


@dataclass
class RankedList:
    """One list's hits, best first, and where they come from (the space and the model of the query)."""

    source: pb.ModelRef
    hits: list[pb.Hit]
    weight: float = 1.0


# (weight, rank from 1, score, the list's lowest score, its highest) -> what the hit adds to its fused score
Contribution = Callable[[float, int, float, float, float], float]


def reciprocal_rank_fusion(lists: Sequence[RankedList], rrf_k: float, k: int) -> list[pb.Hit]:
    """The top k of the lists by the sum of weight / (rrf_k + rank)."""
    return _fuse(lists, k, lambda weight, rank, score, low, high: weight / (rrf_k + rank))


def weighted_scores(lists: Sequence[RankedList], k: int) -> list[pb.Hit]:
    """The top k of the lists by the sum of weight x score, each list's scores min-max normalised to [0, 1]
    (a list whose scores are all equal counts 1 for each of its hits)."""

    def normalised(weight: float, rank: int, score: float, low: float, high: float) -> float:
        return weight * ((score - low) / (high - low) if high > low else 1.0)

    return _fuse(lists, k, normalised)


def _fuse(lists: Sequence[RankedList], k: int, contribution: Contribution) -> list[pb.Hit]:
    fused: dict[str, float] = {}
    best: dict[str, tuple[int, pb.Hit]] = {}  # the best-ranked source of each id
    sources: dict[str, list[pb.HitSource]] = {}
    for ranked in lists:
        scores = [hit.score for hit in ranked.hits]
        low, high = (min(scores), max(scores)) if scores else (0.0, 0.0)
        seen: set[str] = set()
        for rank, hit in enumerate(ranked.hits, start=1):
            if hit.id in seen:
                continue
            seen.add(hit.id)
            fused[hit.id] = fused.get(hit.id, 0.0) + contribution(ranked.weight, rank, hit.score, low, high)
            sources.setdefault(hit.id, []).append(
                pb.HitSource(model=ranked.source, rank=rank, score=hit.score)
            )
            if hit.id not in best or rank < best[hit.id][0]:
                best[hit.id] = (rank, hit)
    order = sorted(fused, key=lambda item_id: (-fused[item_id], best[item_id][0], item_id))
    return [
        pb.Hit(
            id=item_id,
            score=fused[item_id],
            kind=best[item_id][1].kind,
            payload_json=best[item_id][1].payload_json,
            shard=best[item_id][1].shard,
            sources=sorted(sources[item_id], key=lambda source: source.rank),
        )
        for item_id in order[:k]
    ]
