"""Search engines over one space's rows: exact inner product, and two FAISS engines for large shards.

Rows are the space's float32 matrix (L2-normalised, so inner product is cosine); an engine keeps only
what it needs beside it (codes or a graph), gets new rows appended in order, and answers top-k over the
rows a selection allows (deleted rows and filters are masked out, never physically removed).

- `exact`: one matrix-vector product; recall 1. Below the ANN threshold, and for narrow filters.
- `sq8`: FAISS 8-bit scalar-quantised scan (a quarter of float32's memory traffic) for k x rerank
  candidates, re-ranked exactly in float32. Its recall does not depend on how the data is distributed.
- `hnsw`: FAISS HNSW graph. Sub-millisecond with high recall on real embeddings, whose intrinsic
  dimension is low; on isotropic random vectors its recall collapses (see the README's figures).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import faiss
import numpy as np

from services.common.topk import exact_top_k

Result = tuple[np.ndarray, np.ndarray]  # (rows, scores), best first


def _restrict(params: faiss.SearchParameters, selection: np.ndarray | None) -> np.ndarray | None:
    """Limit a FAISS search to the selected rows; returns the bitmap, which the caller must keep alive
    until the search is done (the selector points into it without owning it)."""
    if selection is None:
        return None
    bits = np.packbits(selection, bitorder="little")
    params.sel = faiss.IDSelectorBitmap(selection.shape[0], faiss.swig_ptr(bits))
    return bits


def _found(labels: np.ndarray, scores: np.ndarray) -> Result:
    keep = labels >= 0
    return labels[keep].astype(np.int64), scores[keep].astype(np.float32)


class Engine(ABC):
    name: str

    @abstractmethod
    def add(self, rows: np.ndarray) -> None:
        """Rows appended to the space (row numbers continue from the last add)."""

    @abstractmethod
    def search(self, rows: np.ndarray, query: np.ndarray, k: int, selection: np.ndarray | None) -> Result:
        """Top-k over `rows` (the space's matrix so far) among the selected rows."""

    def serialize(self) -> np.ndarray | None:
        """The engine's state for a snapshot (None: rebuilt from the rows)."""
        return None


class ExactEngine(Engine):
    name = "exact"

    def add(self, rows: np.ndarray) -> None:
        """Nothing to keep: the space's matrix is all it searches."""

    def search(self, rows: np.ndarray, query: np.ndarray, k: int, selection: np.ndarray | None) -> Result:
        return exact_top_k(rows, query, k, selection)


class FaissEngine(Engine):
    def __init__(self, index: faiss.Index) -> None:
        self.index = index

    def add(self, rows: np.ndarray) -> None:
        if rows.shape[0]:
            self.index.add(np.ascontiguousarray(rows, dtype=np.float32))

    def serialize(self) -> np.ndarray | None:
        return faiss.serialize_index(self.index)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)


class ScalarQuantizedEngine(FaissEngine):
    name = "sq8"

    def __init__(self, index: faiss.Index, rerank: int) -> None:
        super().__init__(index)
        self.rerank = rerank

    def search(self, rows: np.ndarray, query: np.ndarray, k: int, selection: np.ndarray | None) -> Result:
        indexed = min(self.size, rows.shape[0])
        params = faiss.SearchParameters()
        bits = _restrict(params, None if selection is None else selection[:indexed])
        wanted = min(k * self.rerank, indexed)
        _, labels = self.index.search(query[None, :], wanted, params=params)
        del bits
        candidates = labels[0][labels[0] >= 0]
        exact = rows[candidates] @ query
        order = np.argsort(-exact, kind="stable")[:k]
        return candidates[order].astype(np.int64), exact[order].astype(np.float32)


class HnswEngine(FaissEngine):
    name = "hnsw"

    def __init__(self, index: faiss.Index, ef_search: int) -> None:
        super().__init__(index)
        self.ef_search = ef_search

    def search(self, rows: np.ndarray, query: np.ndarray, k: int, selection: np.ndarray | None) -> Result:
        indexed = min(self.size, rows.shape[0])
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from faiss's stubs
        params.efSearch = max(self.ef_search, k)
        bits = _restrict(params, None if selection is None else selection[:indexed])
        scores, labels = self.index.search(query[None, :], min(k, indexed), params=params)
        del bits
        return _found(labels[0], scores[0])


@dataclass(frozen=True)
class EngineConfig:
    """Which engine a space uses at which size, and its parameters (the INDEX_* settings)."""

    ann_threshold: int = 20_000
    ann_engine: str = "sq8"
    sq8_rerank: int = 10
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128

    def wants_ann(self, live_items: int) -> bool:
        return self.ann_threshold > 0 and live_items >= self.ann_threshold

    def build(self, rows: np.ndarray) -> Engine:
        """A new ANN engine holding `rows` (the space's whole matrix)."""
        dimension = rows.shape[1]
        index: faiss.Index
        if self.ann_engine == "hnsw":
            index = faiss.IndexHNSWFlat(dimension, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.hnsw_ef_construction
            engine: FaissEngine = HnswEngine(index, self.hnsw_ef_search)
        else:
            # Per-dimension ranges learnt from the rows at hand; later rows outside them are clipped,
            # which only costs candidates precision: the re-rank is exact.
            index = faiss.IndexScalarQuantizer(
                dimension, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
            index.train(np.ascontiguousarray(rows, dtype=np.float32))
            engine = ScalarQuantizedEngine(index, self.sq8_rerank)
        engine.add(rows)
        return engine

    def restore(self, name: str, state: np.ndarray) -> Engine:
        index = faiss.deserialize_index(state)
        if name == "hnsw":
            return HnswEngine(index, self.hnsw_ef_search)
        return ScalarQuantizedEngine(index, self.sq8_rerank)
