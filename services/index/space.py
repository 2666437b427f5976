"""One space's items on one shard: rows of vectors with their ids, kinds, payloads and models.

Rows are only appended: an upsert of an existing id appends a new row and retires the old one, a delete
retires a row. Retired rows are masked out of every search, and dropped (`compact`) once they are as many
as the live ones and past a floor, so that memory stays proportional to the live items whatever the
rewrites; loading a snapshot drops them too. One lock serialises mutations and searches of the space
(FAISS indexes are not safe for a search during an add); the store applies writes in small chunks so
searches interleave.
"""

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.common.items import payload_terms
from services.common.topk import exact_top_k
from services.index.engines import Engine, EngineConfig, ExactEngine
from services.index.records import Item, Op

# A filter that leaves at most this many rows is searched exactly over just those rows.
_EXACT_FILTER_ROWS = 20_000


@dataclass
class Found:
    id: str
    score: float
    kind: int
    payload_json: str


class Space:
    def __init__(self, name: str, dimension: int, config: EngineConfig, epoch: int = 0) -> None:
        self.name = name
        self.dimension = dimension
        self.config = config
        self.epoch = epoch  # the generation of the space these rows belong to (claims.py)
        self.lock = threading.Lock()
        self.count = 0
        self._vectors = np.zeros((16, dimension), dtype=np.float32)
        self._kinds = np.zeros(16, dtype=np.uint8)
        self._alive = np.zeros(16, dtype=bool)
        self._models = np.zeros(16, dtype=np.int32)
        self.ids: list[str] = []
        self.payloads: list[str] = []
        self.model_refs: list[tuple[str, str]] = []
        self._model_numbers: dict[tuple[str, str], int] = {}
        self.row_of: dict[str, int] = {}
        self._postings: dict[tuple[str, str], set[int]] = {}
        self.engine: Engine = ExactEngine()

    @property
    def live(self) -> int:
        return len(self.row_of)

    def wants_compaction(self, floor: int) -> bool:
        """Retired rows are at least `floor` and at least as many as the live ones: dropping them costs
        a copy of the live rows, paid for by as many writes."""
        retired = self.count - self.live
        return retired >= max(self.live, floor, 1)

    def compact(self) -> None:
        """Rebuild the rows, postings and engine from the live rows only. Only the store's writer mutates a
        space, so the rows stay as they are while this builds outside the lock; searches go on over the
        old rows until the swap."""
        keep = np.flatnonzero(self._alive[: self.count])
        fresh = Space.from_state(
            self.name,
            {
                "vectors": self._vectors[keep],
                "kinds": self._kinds[keep],
                "alive": np.ones(keep.shape[0], dtype=bool),
                "models": self._models[keep],
                "ids": [self.ids[row] for row in keep.tolist()],
                "payloads": [self.payloads[row] for row in keep.tolist()],
                "model_refs": list(self.model_refs),
                "engine": self.engine.name,
                "engine_state": None,
                "epoch": self.epoch,
            },
            self.config,
        )
        with self.lock:
            self.count = fresh.count
            self._vectors, self._kinds, self._alive, self._models = (
                fresh._vectors,
                fresh._kinds,
                fresh._alive,
                fresh._models,
            )
            self.ids, self.payloads, self.row_of, self._postings = (
                fresh.ids,
                fresh.payloads,
                fresh.row_of,
                fresh._postings,
            )
            self.engine = fresh.engine

    def _grow(self, needed: int) -> None:
        capacity = self._vectors.shape[0]
        if needed <= capacity:
            return
        capacity = max(needed, capacity * 2)
        vectors = np.zeros((capacity, self.dimension), dtype=np.float32)
        vectors[: self.count] = self._vectors[: self.count]
        self._vectors = vectors
        for name in ("_kinds", "_alive", "_models"):
            old = getattr(self, name)
            new = np.zeros(capacity, dtype=old.dtype)
            new[: self.count] = old[: self.count]
            setattr(self, name, new)

    def _retire(self, row: int) -> None:
        self._alive[row] = False
        for term in payload_terms(self.payloads[row]):
            rows = self._postings.get(term)
            if rows is not None:
                rows.discard(row)
                if not rows:
                    del self._postings[term]

    def _model_number(self, item: Item) -> int:
        key = (item.model_id, item.model_version)
        number = self._model_numbers.get(key)
        if number is None:
            number = self._model_numbers[key] = len(self.model_refs)
            self.model_refs.append(key)
        return number

    def apply(self, ops: Sequence[Op]) -> None:
        """Apply upserts and deletes in order (under the lock; the caller checked dimensions)."""
        with self.lock:
            first_new = self.count
            self._grow(self.count + sum(1 for op in ops if op.item is not None))
            for op in ops:
                old = self.row_of.pop(op.item_id, None)
                if old is not None:
                    self._retire(old)
                if op.item is None:
                    continue
                row = self.count
                self._vectors[row] = op.item.vector
                self._kinds[row] = op.item.kind
                self._alive[row] = True
                self._models[row] = self._model_number(op.item)
                self.ids.append(op.item.id)
                self.payloads.append(op.item.payload_json)
                for term in payload_terms(op.item.payload_json):
                    self._postings.setdefault(term, set()).add(row)
                self.row_of[op.item.id] = row
                self.count += 1
            if not isinstance(self.engine, ExactEngine):
                self.engine.add(self._vectors[first_new : self.count])
        if isinstance(self.engine, ExactEngine) and self.config.wants_ann(self.live):
            self._switch_to_ann()

    def _switch_to_ann(self) -> None:
        """Build the ANN engine over every row so far. Only the store's writer mutates, so the rows stay
        as they are while it builds outside the lock, and searches go on with the exact engine."""
        engine = self.config.build(self._vectors[: self.count])
        with self.lock:
            engine.add(self._vectors[engine_size(engine) : self.count])
            self.engine = engine

    def _selection(self, kinds: Sequence[int], payload_equals: dict[str, str]) -> np.ndarray | None:
        """The rows a search may return; None: every row (nothing retired, no filter)."""
        if self.live == self.count and not kinds and not payload_equals:
            return None
        selection = self._alive[: self.count].copy()
        if kinds:
            selection &= np.isin(self._kinds[: self.count], np.asarray(kinds, dtype=np.uint8))
        for term in payload_equals.items():
            matching = np.zeros(self.count, dtype=bool)
            matching[list(self._postings.get(term, ()))] = True
            selection &= matching
        return selection

    def search(
        self,
        query: np.ndarray,
        k: int,
        kinds: Sequence[int] = (),
        payload_equals: dict[str, str] | None = None,
    ) -> list[Found]:
        with self.lock:
            rows = self._vectors[: self.count]
            selection = self._selection(kinds, payload_equals or {})
            if selection is not None and int(selection.sum()) <= _EXACT_FILTER_ROWS:
                chosen = np.flatnonzero(selection)
                local, scores = exact_top_k(rows[chosen], query, k, None)
                found_rows = chosen[local]
            else:
                found_rows, scores = self.engine.search(rows, query, k, selection)
            return [
                Found(self.ids[row], float(score), int(self._kinds[row]), self.payloads[row])
                for row, score in zip(found_rows.tolist(), scores.tolist(), strict=True)
            ]

    def state(self) -> dict[str, object]:
        """A copy of everything a snapshot holds (under the lock, so it is one consistent moment)."""
        with self.lock:
            return {
                "vectors": self._vectors[: self.count].copy(),
                "kinds": self._kinds[: self.count].copy(),
                "alive": self._alive[: self.count].copy(),
                "models": self._models[: self.count].copy(),
                "ids": list(self.ids),
                "payloads": list(self.payloads),
                "model_refs": list(self.model_refs),
                "engine": self.engine.name,
                "engine_state": self.engine.serialize(),
                "epoch": self.epoch,
            }

    @classmethod
    def from_state(cls, name: str, state: dict[str, object], config: EngineConfig) -> "Space":
        """Load a snapshot's state: live rows only; the ANN engine is reused when nothing was retired and
        INDEX_ANN_ENGINE has not changed, else rebuilt."""
        vectors = np.asarray(state["vectors"], dtype=np.float32)
        alive = np.asarray(state["alive"], dtype=bool)
        kinds = np.asarray(state["kinds"], dtype=np.uint8)
        models = np.asarray(state["models"], dtype=np.int32)
        ids: list[str] = state["ids"]  # type: ignore[assignment]
        payloads: list[str] = state["payloads"]  # type: ignore[assignment]
        model_refs: list[tuple[str, str]] = [tuple(ref) for ref in state["model_refs"]]  # type: ignore[attr-defined,misc]
        space = cls(name, vectors.shape[1], config, int(state.get("epoch", 0)))  # type: ignore[call-overload]
        if alive.all() and state.get("engine_state") is not None and state["engine"] == config.ann_engine:
            space._load_rows(vectors, kinds, models, ids, payloads, model_refs)
            space.engine = config.restore(str(state["engine"]), state["engine_state"])  # type: ignore[arg-type]
            return space
        keep = np.flatnonzero(alive)
        space._load_rows(
            vectors[keep],
            kinds[keep],
            models[keep],
            [ids[row] for row in keep],
            [payloads[row] for row in keep],
            model_refs,
        )
        if config.wants_ann(space.live):
            space.engine = config.build(space._vectors[: space.count])
        return space

    def _load_rows(
        self,
        vectors: np.ndarray,
        kinds: np.ndarray,
        models: np.ndarray,
        ids: list[str],
        payloads: list[str],
        model_refs: list[tuple[str, str]],
    ) -> None:
        count = vectors.shape[0]
        self._vectors = np.array(vectors, dtype=np.float32, copy=True).reshape(count, self.dimension)
        if count == 0:
            self._vectors = np.zeros((16, self.dimension), dtype=np.float32)
        self._kinds = kinds.copy() if count else np.zeros(16, dtype=np.uint8)
        self._alive = np.ones(max(count, 16), dtype=bool)
        self._models = models.copy() if count else np.zeros(16, dtype=np.int32)
        self.count = count
        self.ids = ids
        self.payloads = payloads
        self.model_refs = model_refs
        self._model_numbers = {ref: number for number, ref in enumerate(model_refs)}
        self.row_of = {item_id: row for row, item_id in enumerate(ids)}
        for row, payload in enumerate(payloads):
            for term in payload_terms(payload):
                self._postings.setdefault(term, set()).add(row)


def engine_size(engine: Engine) -> int:
    return int(getattr(engine, "size", 0))
