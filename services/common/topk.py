"""Top-k: the range a caller's k must be in, and the exact scan of every process that ranks rows."""

import numpy as np

from services.common.errors import InvalidArgument


def check_k(k: int, limit: int, setting: str) -> None:
    """k within 1..`limit`; the refusal names the `setting` that sets the limit."""
    if not 1 <= k <= limit:
        raise InvalidArgument(f"k={k} is out of range; use 1..{limit} ({setting})")


def exact_top_k(
    rows: np.ndarray, query: np.ndarray, k: int, selection: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of `rows @ query` among the selected ones (selection: a bool mask over the rows), as
    (row numbers, scores), best first."""
    return top_k_of(rows @ query, k, selection)


def top_k_of(scores: np.ndarray, k: int, selection: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of `scores` among the selected ones, as (row numbers, scores), best first."""
    if selection is not None:
        scores = np.where(selection, scores, -np.inf)
        k = min(k, int(selection.sum()))
    k = min(k, scores.shape[0])
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    top = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(scores.shape[0])
    order = top[np.argsort(-scores[top], kind="stable")]
    return order.astype(np.int64), scores[order].astype(np.float32)
