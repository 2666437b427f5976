"""EASE (Steck, 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): the item-item matrix B
that best rebuilds each user's interaction row from the user's other items,

    B = argmin |X - X B|^2 + lambda |B|^2 with diag(B) = 0,  closed form: P = (X'X + lambda I)^-1,
    B_ij = -P_ij / P_jj (i != j), B_jj = 0,

where X is users x items, each interaction weighted (scale.interaction_weights). A user's score of an
item is the user's row of X times B's column. It is one linear solve, no epochs, and on MovieLens-sized
catalogues it ranks about twice as well as popularity on held-out interactions (README).

Written here rather than taken from a library: it is a dozen lines of numpy and LAPACK, and doing it in
place keeps a Fit's peak at one items x items float32 matrix (plus the serving one), which the
libraries that ship EASE (RecBole, for one) do not. The item count is bounded by USERITEM_EASE_MAX_ITEMS
(memory.py counts it).

lambda = USERITEM_EASE_L2 (or the Fit's l2) x the mean squared interaction weight, so one setting suits
implicit feedback (weights 1) and ratings (weights 1 to 5.5 on 0.5 to 5 stars) alike.

With validation (USERITEM_VALIDATION_FRACTION > 0), B is solved once on the training share to measure
validation recall@10 and NDCG@10 (reported as the Fit's one epoch), then again on every interaction for
the version that serves.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse
from scipy.linalg import lapack

from services.common.errors import FailedPrecondition
from services.useritem.interactions import Dataset
from services.useritem.model import EASE, Metrics, TrainedModel
from services.useritem.ranking import ranking_figures, seen_lists
from services.useritem.scale import interaction_weights
from services.useritem.training import EpochReport, FitCancelled, split

GRAM_BLOCK = 1024  # columns of X'X made at once (sparse products of bounded size)


@dataclass(frozen=True)
class EaseConfig:
    l2: float
    validation_fraction: float
    seed: int


class EaseDiverged(FailedPrecondition):
    """The solve failed or gave numbers that are not finite: lambda too small for the data."""


def item_weights(
    user_rows: np.ndarray,
    item_rows: np.ndarray,
    weights: np.ndarray,
    shape: tuple[int, int],
    l2: float,
    cancelled: threading.Event,
) -> np.ndarray:
    """B (float32 [items, items], C order), solved in place in one items x items matrix."""
    items = shape[1]
    matrix = scipy.sparse.csr_matrix((weights, (user_rows, item_rows)), shape=shape, dtype=np.float32)
    columns = matrix.tocsc()
    transposed = matrix.T.tocsr()
    # Fortran order: LAPACK factorises and inverts it where it lies; it is symmetric, so its transpose
    # (C order, for fast rows when serving) is the same matrix.
    gram = np.empty((items, items), dtype=np.float32, order="F")
    for start in range(0, items, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, items)
        gram[:, start:stop] = (transposed @ columns[:, start:stop]).toarray()
    _check(cancelled)
    penalty = l2 * float(np.mean(np.square(weights, dtype=np.float64))) if len(weights) else l2
    gram[np.diag_indices(items)] += np.float32(penalty)
    del matrix, columns, transposed
    factor, info = lapack.spotrf(gram, lower=1, overwrite_a=1, clean=0)
    if info != 0:
        raise EaseDiverged(
            f"EASE's solve failed (X'X + lambda I is not positive definite at lambda = {penalty:g}): raise "
            "the Fit's l2 (USERITEM_EASE_L2); nothing was saved and the serving version is unchanged"
        )
    _check(cancelled)
    inverse, info = lapack.spotri(factor, lower=1, overwrite_c=1)
    if info != 0:
        raise EaseDiverged(
            f"EASE's inverse failed (LAPACK info {info}): raise the Fit's l2 (USERITEM_EASE_L2)"
        )
    _symmetrise_lower(inverse)
    result = inverse.T  # C order, the same symmetric matrix
    diagonal = np.diagonal(result).copy()
    result /= -diagonal[None, :]
    np.fill_diagonal(result, 0.0)
    if not np.isfinite(result).all():
        raise EaseDiverged(
            "EASE's weights are not finite: raise the Fit's l2 (USERITEM_EASE_L2); nothing was saved"
        )
    return result


def _symmetrise_lower(matrix: np.ndarray) -> None:
    """Copy the lower triangle (what LAPACK's potri leaves) over the upper, a block of columns at a time."""
    size = matrix.shape[0]
    for start in range(0, size, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, size)
        square = matrix[start:stop, start:stop]
        matrix[start:stop, start:stop] = np.tril(square) + np.tril(square, -1).T
        matrix[start:stop, stop:] = matrix[stop:, start:stop].T


def _check(cancelled: threading.Event) -> None:
    if cancelled.is_set():
        raise FitCancelled("the Fit was cancelled")


def train_ease(
    data: Dataset,
    config: EaseConfig,
    implicit: bool,
    scale: tuple[float, float],
    report: Callable[[EpochReport], None],
    cancelled: threading.Event,
) -> tuple[np.ndarray, np.ndarray, Metrics]:
    """(B, each interaction's weight, metrics)."""
    started = time.perf_counter()
    weights = interaction_weights(data.ratings, implicit, scale)
    shape = (len(data.users), len(data.items))
    train_rows, valid_rows = split(data, config.validation_fraction, config.seed)
    recall = ndcg = 0.0
    if len(valid_rows):
        held_in = (data.user_rows[train_rows], data.item_rows[train_rows], weights[train_rows])
        partial = item_weights(*held_in, shape, config.l2, cancelled)
        history = scipy.sparse.csr_matrix((held_in[2], held_in[:2]), shape=shape, dtype=np.float32)
        figures = ranking_figures(
            lambda users: history[users] @ partial,
            data.user_rows,
            data.item_rows,
            train_rows,
            valid_rows,
            *shape,
        )
        del partial
        recall, ndcg = figures.recall_at_10, figures.ndcg_at_10
        report(EpochReport(1, 1, 0.0, 0.0, recall, ndcg))
    _check(cancelled)
    weights_matrix = item_weights(data.user_rows, data.item_rows, weights, shape, config.l2, cancelled)
    if not len(valid_rows):
        report(EpochReport(1, 1, 0.0, 0.0, 0.0, 0.0))
    metrics = Metrics(
        validation_recall_at_10=recall,
        validation_ndcg_at_10=ndcg,
        epochs=1,
        train_seconds=time.perf_counter() - started,
        interactions=len(data),
    )
    return weights_matrix, weights, metrics


def build_ease_model(
    name: str,
    data: Dataset,
    weights_matrix: np.ndarray,
    weights: np.ndarray,
    metrics: Metrics,
    implicit: bool,
    scale: tuple[float, float],
    l2: float,
) -> TrainedModel:
    offsets, seen_items = seen_lists(data.user_rows, data.item_rows, len(data.users))
    order = np.lexsort((data.item_rows, data.user_rows))
    return TrainedModel(
        name=name,
        implicit=implicit,
        rating_min=scale[0],
        rating_max=scale[1],
        global_mean=0.0,
        users=data.users,
        items=data.items,
        user_vectors=np.zeros((len(data.users), 0), dtype=np.float32),
        item_vectors=np.zeros((len(data.items), 0), dtype=np.float32),
        user_bias=np.zeros(len(data.users), dtype=np.float32),
        item_bias=np.zeros(len(data.items), dtype=np.float32),
        seen_offsets=offsets,
        seen_items=seen_items,
        metrics=metrics,
        created=time.time(),
        l2=l2,
        kind=EASE,
        item_weights=weights_matrix,
        seen_weights=weights[order].astype(np.float32),
    )
