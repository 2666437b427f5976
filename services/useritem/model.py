"""A trained user-item model: vectors, biases, id maps and seen items; immutable once built.

Serving reads one TrainedModel per call, and a new Fit replaces the whole object, so no call ever mixes
two versions. Scores: predicted rating = global mean + user bias + item bias + dot(user, item) for
explicit models; dot(user, item) + item bias (a ranking score) for implicit ones.
"""

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from embeddings.v1 import types_pb2 as pb

from services.common.model_card import ModelCard
from services.common.topk import exact_top_k

Ranked = tuple[np.ndarray, np.ndarray]  # item rows, scores; best first


@dataclass(frozen=True)
class Metrics:
    validation_rmse: float = 0.0
    validation_recall_at_10: float = 0.0
    train_loss: float = 0.0
    epochs: int = 0
    train_seconds: float = 0.0
    interactions: int = 0


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

    @cached_property
    def version(self) -> str:
        """Content hash of everything that decides an answer: same data and seed, same version."""
        digest = hashlib.sha256()
        for array in (self.user_vectors, self.item_vectors, self.user_bias, self.item_bias, self.seen_items):
            digest.update(np.ascontiguousarray(array).tobytes())
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
        digest.update(repr(settings).encode())
        return digest.hexdigest()[:16]

    @property
    def factors(self) -> int:
        return int(self.item_vectors.shape[1])

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
    def card(self) -> ModelCard:
        kind = "implicit (BPR)" if self.implicit else "explicit ratings"
        quality = (
            f"validation recall@10 {self.metrics.validation_recall_at_10:.3f}"
            if self.implicit
            else f"validation RMSE {self.metrics.validation_rmse:.4f}"
        )
        return ModelCard(
            id=self.name,
            version=self.version,
            dimension=self.factors,
            space=self.space,
            input_kinds=(pb.INPUT_KIND_USER, pb.INPUT_KIND_ITEM),
            description=f"matrix factorisation of {kind}: {len(self.users)} users, {len(self.items)} items, "
            f"{self.metrics.interactions} interactions, {quality}",
        )

    def seen(self, user_row: int) -> np.ndarray:
        return self.seen_items[self.seen_offsets[user_row] : self.seen_offsets[user_row + 1]]

    def recommend(self, user_row: int, k: int, include_seen: bool) -> Ranked:
        exclude = None if include_seen else self.seen(user_row)
        return self.rank(self.user_vectors[user_row], float(self.user_bias[user_row]), k, exclude)

    def rank(self, user_vector: np.ndarray, user_bias: float, k: int, exclude: np.ndarray | None) -> Ranked:
        """Top-k items for a user vector; scores are predicted ratings (explicit) or ranking scores."""
        selection = None
        if exclude is not None and len(exclude):
            selection = np.ones(len(self.items), dtype=bool)
            selection[exclude] = False
        query = np.append(user_vector, np.float32(1.0)).astype(np.float32)
        rows, scores = exact_top_k(self._scoring_rows, query, k, selection)
        if not self.implicit:
            scores = scores + np.float32(self.global_mean + user_bias)
        return rows, scores

    def similar_items(self, item_row: int, k: int) -> Ranked:
        """Items by cosine similarity of their vectors to item `item_row` (itself excluded)."""
        selection = np.ones(len(self.items), dtype=bool)
        selection[item_row] = False
        return exact_top_k(self._unit_items, self._unit_items[item_row], k, selection)

    def fold_in(self, item_rows: np.ndarray, ratings: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
        """A new user's (vector, bias) by least squares against the fixed item vectors.

        Explicit: minimise sum (r - mean - item bias - user bias - dot(p, q))^2 + l2 * (u |p|^2 + b^2),
        the per-user part of what training minimised: there, l2 * (|p|^2 + b^2) on ratings divided by
        u = rating_unit, which is this multiplied out by u^2 in the ratings' own units. Implicit: the
        weighted least squares of implicit ALS, target 1 for the interacted items (weight 1 + alpha) and 0
        for every other item (weight 1).
        """
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
