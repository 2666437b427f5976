"""Reciprocal rank fusion and the weighted mix of normalised scores: one hit per id, its sources, the
documented formulas, ties and weights."""

import pytest
from embeddings.v1 import types_pb2 as pb

from services.gateway.rank_fusion import RankedList, reciprocal_rank_fusion, weighted_scores

A = pb.ModelRef(id="model-a", version="1", space="space-a")
B = pb.ModelRef(id="model-b", version="2", space="space-b")


def hits(*pairs: tuple[str, float], shard: str = "") -> list[pb.Hit]:
    return [
        pb.Hit(id=item_id, score=score, payload_json=f'{{"from": "{item_id}"}}', shard=shard)
        for item_id, score in pairs
    ]


def test_rrf_sums_one_over_k_plus_rank_and_merges_duplicate_ids() -> None:
    lists = [
        RankedList(A, hits(("x", 0.9), ("y", 0.8), ("z", 0.1), shard="shard-a")),
        RankedList(B, hits(("y", 0.5), ("w", 0.4), shard="shard-b")),
    ]
    fused = reciprocal_rank_fusion(lists, 60.0, 10)
    assert [hit.id for hit in fused] == ["y", "x", "w", "z"]
    by_id = {hit.id: hit for hit in fused}
    assert by_id["y"].score == pytest.approx(1 / 62 + 1 / 61)
    assert by_id["x"].score == pytest.approx(1 / 61)
    assert [(source.model.space, source.rank, source.score) for source in by_id["y"].sources] == [
        ("space-b", 1, pytest.approx(0.5)),
        ("space-a", 2, pytest.approx(0.8)),
    ]
    assert by_id["y"].shard == "shard-b"  # the kind, payload and shard of its best-ranked source
    assert [source.model.id for source in by_id["w"].sources] == ["model-b"]


def test_rrf_keeps_the_top_k_and_breaks_ties_by_best_rank_then_id() -> None:
    lists = [RankedList(A, hits(("b", 0.9), ("a", 0.8))), RankedList(B, hits(("a", 0.9), ("b", 0.8)))]
    fused = reciprocal_rank_fusion(lists, 60.0, 1)
    assert [hit.id for hit in fused] == ["a"]  # equal scores, equal best ranks: by id


def test_rrf_weights_scale_each_list() -> None:
    lists = [
        RankedList(A, hits(("x", 0.9), ("y", 0.8)), 0.2),
        RankedList(B, hits(("y", 0.3), ("x", 0.2)), 0.8),
    ]
    fused = reciprocal_rank_fusion(lists, 60.0, 2)
    assert [hit.id for hit in fused] == ["y", "x"]
    assert fused[0].score == pytest.approx(0.2 / 62 + 0.8 / 61)


def test_weighted_normalises_each_list_to_zero_one() -> None:
    lists = [
        RankedList(A, hits(("x", 0.9), ("y", 0.7), ("z", 0.5)), 0.5),
        RankedList(B, hits(("z", 40.0), ("y", 30.0), ("x", 0.0)), 0.5),
    ]
    fused = {hit.id: hit.score for hit in weighted_scores(lists, 3)}
    assert fused == {
        "x": pytest.approx(0.5),
        "y": pytest.approx(0.5 * 0.5 + 0.5 * 0.75),
        "z": pytest.approx(0.5),
    }


def test_weighted_counts_a_list_of_equal_scores_as_one_and_a_missing_id_as_zero() -> None:
    lists = [RankedList(A, hits(("x", 0.4), ("y", 0.4)), 0.3), RankedList(B, hits(("y", 2.0)), 0.7)]
    fused = {hit.id: hit.score for hit in weighted_scores(lists, 3)}
    assert fused == {"x": pytest.approx(0.3), "y": pytest.approx(1.0)}


def test_no_lists_no_hits() -> None:
    assert reciprocal_rank_fusion([], 60.0, 5) == []
    assert weighted_scores([RankedList(A, [])], 5) == []
