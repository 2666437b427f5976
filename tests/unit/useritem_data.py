"""Synthetic user-item data with planted latent factors, shared by the user-item unit tests.

Every user and item has a hidden vector; a user's affinity for an item is their dot product (plus a small
item bias for explicit ratings). Explicit ratings are a clipped affine map of that affinity plus Gaussian
noise; implicit interactions are drawn with probability rising with the affinity. The tests then check that
training recovers the planted structure, which a model that learnt nothing could not.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from embeddings.v1 import recommender_pb2 as rec

from services.useritem.interactions import Dataset, FitRules, InteractionBuffer
from services.useritem.training import TrainConfig

RATING_MIN, RATING_MAX = 0.5, 5.0
NOISE = 0.25  # standard deviation of the rating noise


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Train on one thread: these models are tiny, and on a shared 2-core machine torch's thread pool
    makes them many times slower (seconds instead of tenths), not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Planted:
    """The hidden truth and the interactions drawn from it (users u0.., items i0..)."""

    user_factors: np.ndarray  # [users, latent]
    item_factors: np.ndarray  # [items, latent]
    item_bias: np.ndarray  # [items]
    affinity: np.ndarray  # [users, items]: the noiseless score the interactions were drawn from
    user_rows: np.ndarray  # int64, one per interaction
    item_rows: np.ndarray  # int64
    ratings: np.ndarray  # float64 (1 for implicit data)

    @property
    def users(self) -> list[str]:
        return [f"u{row}" for row in range(self.affinity.shape[0])]

    @property
    def items(self) -> list[str]:
        return [f"i{row}" for row in range(self.affinity.shape[1])]

    def seen(self, user: int) -> np.ndarray:
        return np.sort(self.item_rows[self.user_rows == user])

    def top_unseen(self, user: int, k: int) -> np.ndarray:
        """The k items the user likes most by the planted affinity, among those they never interacted with."""
        scores = self.affinity[user].copy()
        scores[self.seen(user)] = -np.inf
        return np.argsort(-scores, kind="stable")[:k]

    def interactions(self, timestamps: bool = False) -> list[rec.Interaction]:
        return [
            rec.Interaction(
                user_id=f"u{user}",
                item_id=f"i{item}",
                rating=float(rating),
                timestamp=index if timestamps else 0,
            )
            for index, (user, item, rating) in enumerate(
                zip(self.user_rows.tolist(), self.item_rows.tolist(), self.ratings.tolist(), strict=True)
            )
        ]

    def chunks(self, size: int) -> Iterator[list[rec.Interaction]]:
        interactions = self.interactions()
        for start in range(0, len(interactions), size):
            yield interactions[start : start + size]


def planted(
    users: int = 200,
    items: int = 100,
    latent: int = 6,
    per_user: int = 30,
    implicit: bool = False,
    seed: int = 7,
) -> Planted:
    rng = np.random.default_rng(seed)
    user_factors = rng.standard_normal((users, latent))
    item_factors = rng.standard_normal((items, latent))
    item_bias = np.zeros(items) if implicit else 0.3 * rng.standard_normal(items)
    affinity = user_factors @ item_factors.T / np.sqrt(latent) + item_bias
    user_rows, item_rows = [], []
    for user in range(users):
        if implicit:
            # Liked items are much more likely to be interacted with: softmax of the affinity.
            weights = np.exp(1.5 * affinity[user])
            chosen = rng.choice(items, per_user, replace=False, p=weights / weights.sum())
        else:
            chosen = rng.choice(items, per_user, replace=False)
        user_rows.append(np.full(per_user, user))
        item_rows.append(chosen)
    user_array = np.concatenate(user_rows).astype(np.int64)
    item_array = np.concatenate(item_rows).astype(np.int64)
    if implicit:
        ratings = np.ones(len(user_array))
    else:
        clean = 3.0 + 0.9 * affinity[user_array, item_array]
        ratings = np.clip(clean + NOISE * rng.standard_normal(len(user_array)), RATING_MIN, RATING_MAX)
    return Planted(user_factors, item_factors, item_bias, affinity, user_array, item_array, ratings)


def rules(implicit: bool = False, **overrides: object) -> FitRules:
    values: dict[str, object] = {
        "implicit": implicit,
        "rating_min": RATING_MIN,
        "rating_max": RATING_MAX,
        "min_interactions": 20,
        "max_interactions": 1_000_000,
        "max_id_bytes": 64,
    }
    values.update(overrides)
    return FitRules(**values)  # type: ignore[arg-type]


def dataset(data: Planted, implicit: bool = False) -> Dataset:
    """The planted interactions through the real intake: users u0.. and items i0.. keep their rows, since
    each first appears in order (every user interacts, and items are numbered by first appearance, so
    item rows are mapped back by id)."""
    buffer = InteractionBuffer(rules(implicit))
    buffer.add(data.interactions())
    return buffer.dataset()


def config(**overrides: object) -> TrainConfig:
    values: dict[str, object] = {
        "factors": 8,
        "epochs": 40,
        "batch_size": 256,
        "learning_rate": 0.02,
        "l2": 1.0,
        "init_std": 0.1,
        "seed": 0,
        "validation_fraction": 0.1,
        "patience": 3,
        "implicit_negatives": 4,
    }
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]
