"""Validation figures of a ranking: recall@10 and NDCG@10 of each validation user's top 10 (items seen
in training excluded) against the user's held-out items, averaged over users. Every model kind is judged
by the same code, from a function that scores a block of users against every item."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

VALIDATION_USERS = 2000  # validation users scored (a deterministic sample beyond that)
BLOCK_SCORES = 1 << 22  # scores computed at once (16 MiB of float32), whatever the item count
K = 10
_DISCOUNTS = 1.0 / np.log2(np.arange(2, K + 2))

BlockScorer = Callable[[np.ndarray], np.ndarray]  # user rows -> float [len(rows), items]


@dataclass(frozen=True)
class RankingFigures:
    recall_at_10: float = 0.0
    ndcg_at_10: float = 0.0


def seen_lists(user_rows: np.ndarray, item_rows: np.ndarray, users: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, items) of each user's items, CSR style, items sorted within a user (int32)."""
    order = np.lexsort((item_rows, user_rows))
    offsets = np.zeros(users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user_rows, minlength=users), out=offsets[1:])
    return offsets, item_rows[order].astype(np.int32)


def ranking_figures(
    scores: BlockScorer,
    user_rows: np.ndarray,
    item_rows: np.ndarray,
    train_rows: np.ndarray,
    valid_rows: np.ndarray,
    users: int,
    items: int,
) -> RankingFigures:
    """recall@10 (|top 10 ∩ held-out| / min(10, |held-out|)) and NDCG@10 (binary gains) averaged over the
    validation users; zeros without validation rows."""
    if not len(valid_rows):
        return RankingFigures()
    offsets, seen_items = seen_lists(user_rows[train_rows], item_rows[train_rows], users)
    held_users = user_rows[valid_rows]
    asked = np.unique(held_users)
    if len(asked) > VALIDATION_USERS:
        asked = np.sort(np.random.default_rng(0).choice(asked, VALIDATION_USERS, replace=False))
    held_offsets, held_items = seen_lists(held_users, item_rows[valid_rows], users)
    recall = ndcg = 0.0
    k = min(K, items)
    # Users in blocks: the scores of all of them against every item could take gigabytes.
    block = max(1, BLOCK_SCORES // items)
    for start in range(0, len(asked), block):
        chunk = asked[start : start + block]
        matrix = np.asarray(scores(chunk), dtype=np.float32)
        for row, user in enumerate(chunk):
            line = matrix[row]
            line[seen_items[offsets[user] : offsets[user + 1]]] = -np.inf
            top = np.argpartition(-line, k - 1)[:k]
            top = top[np.argsort(-line[top], kind="stable")]
            held = held_items[held_offsets[user] : held_offsets[user + 1]]
            hits = np.isin(top, held)
            wanted = min(K, len(held))
            recall += hits.sum() / wanted
            ndcg += float(_DISCOUNTS[: len(top)][hits].sum() / _DISCOUNTS[:wanted].sum())
    return RankingFigures(float(recall / len(asked)), float(ndcg / len(asked)))
