"""A trained user-item model: its parameters, id maps and seen items; immutable once built.

Serving reads one TrainedModel per call, and a new Fit replaces the whole object, so no call ever mixes
two versions. Two kinds:

- MF (training.py): user and item vectors and biases. Score: predicted rating = global mean + user bias +
  item bias + dot(user, item) for explicit models (clamped to the rating scale where it is shown, the
  order taken before clamping); dot(user, item) + item bias (a ranking score) for implicit ones.
- EASE (ease.py): an items x items matrix B with a zero diagonal. A user's vector is the weight of each
  of the user's interactions over the items (0 elsewhere), an item's vector is B's column, and the score
  is their dot: the weighted sum of the item's weights from the user's items.
"""

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from embeddings.v1 import types_pb2 as pb

from services.common.model_card import ModelCard
from services.common.topk import top_k_of
from services.useritem.content_map import ContentMap
from services.useritem.scale import interaction_weights

MF = "mf"
EASE = "ease"

Ranked = tuple[np.ndarray, np.ndarray]  # item rows, scores; best first


@dataclass(frozen=True)
class Metrics:
    validation_rmse: float = 0.0
    validation_recall_at_10: float = 0.0
    train_loss: float = 0.0
    epochs: int = 0
    train_seconds: float = 0.0
    interactions: int = 0
    validation_ndcg_at_10: float = 0.0


@dataclass(frozen=True, eq=False)
class TrainedModel:
    name: str
    implicit: bool
    rating_min: float
    rating_max: float
    global_mean: float
    users: list[str]
    items: list[str]
    user_vectors: np.ndarray  # float32 [users, factors]
    item_vectors: np.ndarray  # float32 [items, factors]
    user_bias: np.ndarray  # float32 [users]
    item_bias: np.ndarray  # float32 [items]
    seen_offsets: np.ndarray  # int64 [users + 1]: user u saw seen_items[seen_offsets[u]:seen_offsets[u+1]]
    seen_items: np.ndarray  # int32 (int64 in versions saved before it was int32)
    metrics: Metrics = field(default_factory=Metrics)
    created: float = 0.0
    l2: float = 0.0  # the penalty it was trained with, which fold-in applies too
    rating_unit: float = 1.0  # what its ratings were divided by for training (scale.rating_unit)
    kind: str = MF
    item_weights: np.ndarray | None = None  # EASE: float32 [items, items], B
    seen_weights: np.ndarray | None = None  # EASE: float32, each seen item's interaction weight
    content_map: ContentMap | None = None  # MF fitted with item content: content vectors -> item vectors

    @cached_property
    def version(self) -> str:
        """Content hash of everything that decides an answer: same data and seed, same version."""
        digest = hashlib.sha256()
        arrays = (self.user_vectors, self.item_vectors, self.user_bias, self.item_bias, self.seen_items)
        extras = (array for array in (self.item_weights, self.seen_weights) if array is not None)
        for array in (*arrays, *extras):
            digest.update(np.ascontiguousarray(array).data)  # its bytes, not copied
        digest.update("\0".join(self.users).encode())
        digest.update(b"\1")
        digest.update("\0".join(self.items).encode())
        settings: tuple[object, ...] = (
            self.implicit,
            self.global_mean,
            self.rating_min,
            self.rating_max,
            self.l2,
        )
        if self.rating_unit != 1.0:  # versions trained before there was a unit keep their hash
            settings += (self.rating_unit,)
        if self.kind != MF:  # as do MF versions, trained before there were kinds
            settings += (self.kind,)
        if self.content_map is not None:  # and versions without a content map
            digest.update(np.ascontiguousarray(self.content_map.weights).data)
            settings += (self.content_map.space,)
        digest.update(repr(settings).encode())
        return digest.hexdigest()[:16]

    @property
    def factors(self) -> int:
        """The dimension of its user and item vectors (EASE: the item count)."""
        return len(self.items) if self.kind == EASE else int(self.item_vectors.shape[1])

    @property
    def predicts_ratings(self) -> bool:
        return self.kind == MF and not self.implicit

    @property
    def space(self) -> str:
        return f"useritem-{self.name}"

    @cached_property
    def user_index(self) -> dict[str, int]:
        return {user: row for row, user in enumerate(self.users)}

    @cached_property
    def item_index(self) -> dict[str, int]:
        return {item: row for row, item in enumerate(self.items)}

    @cached_property
    def _scoring_rows(self) -> np.ndarray:
        """[item vector, item bias]: one product with [user vector, 1] scores every item."""
        return np.hstack([self.item_vectors, self.item_bias[:, None]]).astype(np.float32)

    @cached_property
    def _unit_items(self) -> np.ndarray:
        norms = np.linalg.norm(self.item_vectors, axis=1, keepdims=True)
        return (self.item_vectors / np.maximum(norms, 1e-12)).astype(np.float32)

    @cached_property
    def _item_gram(self) -> np.ndarray:
        return (self.item_vectors.T.astype(np.float64) @ self.item_vectors).astype(np.float64)

    @cached_property
    def item_counts(self) -> np.ndarray:
        """Interactions of each item in the training data: the popularity fallback's order."""
        return np.bincount(self.seen_items, minlength=len(self.items)).astype(np.float32)

    @cached_property
    def card(self) -> ModelCard:
        if self.kind == EASE:
            kind = "EASE item-item model of " + ("implicit feedback" if self.implicit else "ratings")
        else:
            kind = "matrix factorisation of " + (
                "implicit feedback (BPR)" if self.implicit else "explicit ratings"
            )
        quality = (
            f"validation RMSE {self.metrics.validation_rmse:.4f}"
            if self.predicts_ratings
            else f"validation recall@10 {self.metrics.validation_recall_at_10:.3f}, "
            f"NDCG@10 {self.metrics.validation_ndcg_at_10:.3f}"
        )
        return ModelCard(
            id=self.name,
            version=self.version,
            dimension=self.factors,
            space=self.space,
            input_kinds=(pb.INPUT_KIND_USER, pb.INPUT_KIND_ITEM),
            description=f"{kind}: {len(self.users)} users, {len(self.items)} items, "
            f"{self.metrics.interactions} interactions, {quality}",
        )

    def seen(self, user_row: int) -> np.ndarray:
        return self.seen_items[self.seen_offsets[user_row] : self.seen_offsets[user_row + 1]]

    def user_vector(self, user_row: int) -> tuple[np.ndarray, float]:
        """The user's (vector, bias): what `scores` takes."""
        if self.kind == EASE:
            assert self.seen_weights is not None
            span = slice(self.seen_offsets[user_row], self.seen_offsets[user_row + 1])
            return self.history_vector(self.seen_items[span], self.seen_weights[span]), 0.0
        return self.user_vectors[user_row], float(self.user_bias[user_row])

    def item_vector(self, item_row: int) -> np.ndarray:
        if self.kind == EASE:
            assert self.item_weights is not None
            return np.ascontiguousarray(self.item_weights[:, item_row])
        return self.item_vectors[item_row]

    def history_vector(self, item_rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """EASE: a user's vector from the user's items and their interaction weights."""
        vector = np.zeros(len(self.items), dtype=np.float32)
        vector[item_rows] = weights
        return vector

    def scores(
        self, user_vector: np.ndarray, user_bias: float, item_rows: np.ndarray | None = None
    ) -> np.ndarray:
        """The model's raw scores (not clamped) of every item, or of `item_rows`, for a user vector."""
        if self.kind == EASE:
            assert self.item_weights is not None
            used = np.flatnonzero(user_vector)
            weights = (
                self.item_weights[used] if item_rows is None else self.item_weights[np.ix_(used, item_rows)]
            )
            return (user_vector[used] @ weights).astype(np.float32)
        rows = self._scoring_rows if item_rows is None else self._scoring_rows[item_rows]
        query = np.append(user_vector, np.float32(1.0)).astype(np.float32)
        raw = rows @ query
        if not self.implicit:
            raw = raw + np.float32(self.global_mean + user_bias)
        return raw.astype(np.float32)

    def shown(self, scores: np.ndarray) -> np.ndarray:
        """Scores as answers give them: an explicit model's predicted ratings clamped to its scale."""
        if self.predicts_ratings:
            return np.clip(scores, np.float32(self.rating_min), np.float32(self.rating_max))
        return scores

    def selection(
        self, exclude: np.ndarray | None, candidates: np.ndarray | None = None
    ) -> np.ndarray | None:
        """A bool mask over the items: the `candidates` (None: every item) less the `exclude`d ones."""
        if candidates is None and (exclude is None or not len(exclude)):
            return None
        if candidates is None:
            mask = np.ones(len(self.items), dtype=bool)
        else:
            mask = np.zeros(len(self.items), dtype=bool)
            mask[candidates] = True
        if exclude is not None:
            mask[exclude] = False
        return mask

    def recommend(
        self,
        user_row: int,
        k: int,
        include_seen: bool,
        exclude: np.ndarray | None = None,
        candidates: np.ndarray | None = None,
    ) -> Ranked:
        excluded = _joined(exclude, None if include_seen else self.seen(user_row))
        vector, bias = self.user_vector(user_row)
        return self.rank(vector, bias, k, excluded, candidates)

    def rank(
        self,
        user_vector: np.ndarray,
        user_bias: float,
        k: int,
        exclude: np.ndarray | None,
        candidates: np.ndarray | None = None,
    ) -> Ranked:
        """Top-k items for a user vector, by raw score; the scores shown (see `shown`)."""
        rows, scores = top_k_of(self.scores(user_vector, user_bias), k, self.selection(exclude, candidates))
        return rows, self.shown(scores)

    def score(self, user_row: int, item_rows: np.ndarray) -> np.ndarray:
        """The scores Recommend shows for these items of this user, in their order."""
        vector, bias = self.user_vector(user_row)
        return self.shown(self.scores(vector, bias, item_rows))

    def popular(self, k: int, exclude: np.ndarray | None, candidates: np.ndarray | None) -> Ranked:
        """The popularity fallback: the most interacted-with items, scored by their interaction counts."""
        return top_k_of(self.item_counts, k, self.selection(exclude, candidates))

    def similar_items(self, item_row: int, k: int) -> Ranked:
        """Items like item `item_row` (itself excluded): MF by cosine similarity of their vectors; EASE by
        B's row, the weight the item gives each other item in a score."""
        selection = np.ones(len(self.items), dtype=bool)
        selection[item_row] = False
        if self.kind == EASE:
            assert self.item_weights is not None
            return top_k_of(self.item_weights[item_row].astype(np.float32), k, selection)
        return top_k_of(self._unit_items @ self._unit_items[item_row], k, selection)

    def fold_in(self, item_rows: np.ndarray, ratings: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
        """A new user's (vector, bias).

        EASE: the history vector, each item weighted as in training (ease.interaction_weights). MF
        explicit: minimise sum (r - mean - item bias - user bias - dot(p, q))^2 + l2 * (u |p|^2 + b^2),
        the per-user part of what training minimised: there, l2 * (|p|^2 + b^2) on ratings divided by
        u = rating_unit, which is this multiplied out by u^2 in the ratings' own units. MF implicit: the
        weighted least squares of implicit ALS, target 1 for the interacted items (weight 1 + alpha) and 0
        for every other item (weight 1).
        """
        if self.kind == EASE:
            weights = interaction_weights(ratings, self.implicit, (self.rating_min, self.rating_max))
            return self.history_vector(item_rows, weights), 0.0
        vectors = self.item_vectors[item_rows].astype(np.float64)
        n = len(item_rows)
        if self.implicit:
            gram = self._item_gram + alpha * vectors.T @ vectors + self.l2 * np.eye(self.factors)
            solution = np.linalg.solve(gram, (1.0 + alpha) * vectors.sum(axis=0))
            return solution.astype(np.float32), 0.0
        design = np.hstack([vectors, np.ones((n, 1))])
        target = ratings.astype(np.float64) - self.global_mean - self.item_bias[item_rows]
        penalty = np.full(self.factors + 1, self.l2 * self.rating_unit)
        penalty[-1] = self.l2
        gram = design.T @ design + np.diag(penalty)
        solution = np.linalg.solve(gram, design.T @ target)
        return solution[:-1].astype(np.float32), float(solution[-1])


def _joined(first: np.ndarray | None, second: np.ndarray | None) -> np.ndarray | None:
    parts = [part for part in (first, second) if part is not None and len(part)]
    return np.concatenate(parts) if parts else None
