"""Search quality of the index engines on 50,000 random 384-d unit vectors (the hard case for ANN: no
low-dimensional structure to exploit). The default ANN engine must keep recall@10 >= 0.95."""

import numpy as np
import pytest

from services.index.engines import EngineConfig, ExactEngine

_ROWS, _DIM, _QUERIES, _K = 50_000, 384, 50, 10


def _unit(count: int, rng: np.random.Generator) -> np.ndarray:
    rows = rng.standard_normal((count, _DIM), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(20240611)
    return _unit(_ROWS, rng), _unit(_QUERIES, rng)


def _brute_force(
    rows: np.ndarray, query: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> np.ndarray:
    scores = rows @ query
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    return np.argsort(-scores, kind="stable")[:k]


def test_exact_engine_is_brute_force(data: tuple[np.ndarray, np.ndarray]) -> None:
    rows, queries = data
    engine = ExactEngine()
    allowed = np.zeros(_ROWS, dtype=bool)
    allowed[::3] = True
    for query in queries[:20]:
        for selection in (None, allowed):
            found, scores = engine.search(rows, query, _K, selection)
            expected = _brute_force(rows, query, _K, selection)
            np.testing.assert_array_equal(found, expected)
            np.testing.assert_allclose(scores, (rows @ query)[expected], rtol=1e-6)
    # k beyond what a selection allows returns just the allowed rows, best first
    few = np.zeros(_ROWS, dtype=bool)
    few[[5, 17, 40_000]] = True
    found, scores = engine.search(rows, queries[0], _K, few)
    assert sorted(found.tolist()) == [5, 17, 40_000]
    assert list(scores) == sorted(scores, reverse=True)


def test_default_ann_engine_recall(data: tuple[np.ndarray, np.ndarray]) -> None:
    rows, queries = data
    engine = EngineConfig().build(rows)
    assert engine.name == "sq8"
    hits = 0
    for query in queries:
        found, scores = engine.search(rows, query, _K, None)
        assert len(found) == _K
        np.testing.assert_allclose(scores, rows[found] @ query, rtol=1e-5)  # re-ranked exactly
        assert list(scores) == sorted(scores, reverse=True)
        hits += len(set(found.tolist()) & set(_brute_force(rows, query, _K).tolist()))
    recall = hits / (_K * _QUERIES)
    assert recall >= 0.95, recall


def test_default_ann_engine_recall_with_a_selection(data: tuple[np.ndarray, np.ndarray]) -> None:
    rows, queries = data
    engine = EngineConfig().build(rows)
    even = np.zeros(_ROWS, dtype=bool)
    even[::2] = True
    hits = 0
    for query in queries:
        found, _ = engine.search(rows, query, _K, even)
        assert len(found) == _K
        assert np.all(found % 2 == 0), found
        hits += len(set(found.tolist()) & set(_brute_force(rows, query, _K, even).tolist()))
    recall = hits / (_K * _QUERIES)
    assert recall >= 0.95, recall
