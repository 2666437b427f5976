"""The content map: from what items are (their content vectors, from a text or image model) to what a
matrix factorisation model learnt of them (item vector and bias), so that a new item with no
interactions gets a vector at once (FoldInItems).

Ridge regression in closed form (numpy), from the L2-normalised content vector plus an unpenalised
intercept to [item vector, item bias], fitted on the items that have both content and interactions.
Why ridge, not a small network: the training set is one row per item (hundreds to tens of thousands),
the inputs are already a model's rich embedding, and the targets are vectors MF fitted with an L2
prior, so a linear map is what the data can support; closed form is exact, deterministic (no seed, no
epochs, no learning rate), costs one eigen-decomposition of the d x d Gram matrix (milliseconds to a
second), and its leave-one-out error comes in closed form too, which picks the penalty from a grid
without a held-out split of the few items there are. A network would need tuning and early stopping on
that same small set for, at best, a marginal gain.

Leave-one-out: with the centred content Xc = V diag(s^2) V^T's eigen-decomposition (of Xc^T Xc) and
P = Xc V, the fitted values for penalty l are P diag(1 / (s^2 + l)) P^T Yc, the hat matrix's diagonal is
1/n + sum_j P_ij^2 / (s_j^2 + l), and each item's leave-one-out residual is its residual / (1 - h_ii).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from embeddings.v1 import content_pb2 as cpb

from services.common.errors import InvalidArgument
from services.common.vectors import from_wire

L2_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
MIN_ITEMS = 2  # fewest items with both content and interactions a map is learnt from


@dataclass(frozen=True, eq=False)
class ContentMap:
    space: str  # of the content vectors
    weights: np.ndarray  # float32 [dimension + 1, targets]: one row per content dimension, then the intercept
    l2: float
    items: int  # trained on
    r2: float  # leave-one-out

    @property
    def dimension(self) -> int:
        return int(self.weights.shape[0]) - 1

    def apply(self, content: np.ndarray) -> np.ndarray:
        """The mapped targets (float32 [n, targets]) of content vectors [n, dimension] (normalised here)."""
        unit = _unit_rows(content.astype(np.float64))
        weights = self.weights.astype(np.float64)
        return (unit @ weights[:-1] + weights[-1]).astype(np.float32)

    def info(self) -> cpb.ContentMapInfo:
        return cpb.ContentMapInfo(
            space=self.space, dimension=self.dimension, items=self.items, l2=self.l2, r2=self.r2
        )


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def learn_content_map(
    space: str, content: np.ndarray, targets: np.ndarray, grid: Sequence[float] = L2_GRID
) -> ContentMap:
    """Ridge regression from content [n, d] (normalised here) to targets [n, t], its penalty the one of
    least leave-one-out squared error in `grid`."""
    n = content.shape[0]
    x = _unit_rows(content.astype(np.float64))
    y = targets.astype(np.float64)
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    eigenvalues, basis = np.linalg.eigh(xc.T @ xc)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    projected = xc @ basis  # P: [n, d]
    aligned = projected.T @ yc  # P^T Yc: [d, t]
    squares = projected**2
    total = float((yc**2).sum())
    best: tuple[float, float] | None = None  # (leave-one-out error, l2)
    for l2 in grid:
        shrink = 1.0 / (eigenvalues + l2)
        residual = yc - projected @ (shrink[:, None] * aligned)
        leverage = 1.0 / n + squares @ shrink
        error = float(((residual / np.maximum(1.0 - leverage, 1e-9)[:, None]) ** 2).sum())
        if best is None or error < best[0]:
            best = (error, l2)
    assert best is not None
    error, l2 = best
    coefficients = basis @ ((1.0 / (eigenvalues + l2))[:, None] * aligned)  # [d, t]
    intercept = y_mean - x_mean @ coefficients
    weights = np.vstack([coefficients, intercept[None, :]]).astype(np.float32)
    r2 = 1.0 - error / total if total > 0 else 0.0
    return ContentMap(space, weights, float(l2), n, float(r2))


class ContentBuffer:
    """Item content vectors as a Fit's messages bring them: checked, normalised, the last of an item kept.

    The space may be set on any message (the gateway sets it on the first one with content); once set it
    may not change, and content needs it."""

    def __init__(self, max_items: int, max_id_bytes: int) -> None:
        self._max_items = max_items
        self._max_id_bytes = max_id_bytes
        self._vectors: dict[str, np.ndarray] = {}
        self._count = 0  # item_content entries seen, over every message (the index errors name)
        self.space = ""

    def __len__(self) -> int:
        return len(self._vectors)

    def add(self, contents: Sequence[cpb.ItemContent], space: str) -> None:
        if space and self.space and space != self.space:
            raise InvalidArgument(
                f"is {space!r}, but an earlier message set {self.space!r}; one Fit has one content space",
                field="content_space",
            )
        self.space = self.space or space
        if contents and not self.space:
            raise InvalidArgument(
                "is empty, and the Fit has item_content: name the space of the content vectors "
                "(the gateway does so when it encodes inputs)",
                field="content_space",
            )
        for content in contents:
            field = f"item_content[{self._count}]"
            self._count += 1
            vector = content_vector(content, field, self._max_id_bytes)
            known = next(iter(self._vectors.values()), None)
            if known is not None and known.shape != vector.shape:
                raise InvalidArgument(
                    f"has {vector.shape[0]} dimensions, the Fit's earlier content {known.shape[0]}: "
                    f"content vectors of one space have one dimension",
                    field=f"{field}.vector",
                )
            self._vectors.pop(content.item_id, None)
            self._vectors[content.item_id] = vector
            if len(self._vectors) > self._max_items:
                raise InvalidArgument(
                    f"the Fit has content of more than {self._max_items} items (USERITEM_MAX_IDS)"
                )

    def covering(self, items: Sequence[str]) -> int:
        """How many of `items` have content."""
        return sum(1 for item in items if item in self._vectors)

    def of(self, items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(rows of `items` that have content, their content vectors [rows, d])."""
        rows = [row for row, item in enumerate(items) if item in self._vectors]
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        return np.array(rows, dtype=np.int64), np.stack([self._vectors[items[row]] for row in rows])


def content_vector(content: cpb.ItemContent, field: str, max_id_bytes: int) -> np.ndarray:
    """One item's content vector, checked: an id, a vector (inputs are the gateway's to encode), finite
    and not all zeros."""
    if not content.item_id:
        raise InvalidArgument("is empty", field=f"{field}.item_id")
    if len(content.item_id.encode()) > max_id_bytes:
        raise InvalidArgument(
            f"is longer than {max_id_bytes} UTF-8 bytes (USERITEM_MAX_ID_BYTES)", field=f"{field}.item_id"
        )
    if content.inputs:
        raise InvalidArgument(
            "are given to the user-item worker, which takes content vectors only: send inputs through the "
            "gateway, which encodes them",
            field=f"{field}.inputs",
        )
    if not content.HasField("vector"):
        raise InvalidArgument("is missing: give the item's content vector", field=f"{field}.vector")
    vector = from_wire(content.vector, f"{field}.vector")
    if not np.any(vector):
        raise InvalidArgument("is all zeros: it has no direction to map", field=f"{field}.vector")
    return vector
