"""Interactions in: streamed messages or a CSV/Parquet file, checked, duplicates merged, ids numbered.

Every check names the bad interaction (`interactions[i]` of the stream, or `row i` of the file) and
what to fix; nothing is trained from a Fit that fails one.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from embeddings.v1 import recommender_pb2 as rec

from services.common.errors import InvalidArgument, NotFound


@dataclass(frozen=True)
class FitRules:
    """What one Fit accepts."""

    implicit: bool
    rating_min: float
    rating_max: float
    min_interactions: int
    max_interactions: int
    max_id_bytes: int


@dataclass
class Dataset:
    """Distinct (user, item) pairs, numbered: users[u], items[i] are the ids of rows u and i."""

    users: list[str]
    items: list[str]
    user_rows: np.ndarray  # int64, one per interaction
    item_rows: np.ndarray  # int64
    ratings: np.ndarray  # float32 (all 1 for implicit fits)
    duplicates: int  # interactions dropped because a later one had the same (user, item)

    def __len__(self) -> int:
        return len(self.ratings)


class InteractionBuffer:
    """Collects a Fit stream's interactions, checking each as it arrives."""

    def __init__(self, rules: FitRules) -> None:
        self._rules = rules
        self._users: list[str] = []
        self._items: list[str] = []
        self._ratings: list[float] = []
        self._timestamps: list[int] = []

    def add(self, interactions: Sequence[rec.Interaction]) -> None:
        rules = self._rules
        offset = len(self._users)
        if offset + len(interactions) > rules.max_interactions:
            raise InvalidArgument(
                f"the Fit stream has more than {rules.max_interactions} interactions "
                "(USERITEM_MAX_INTERACTIONS); train on a sample, or raise the limit"
            )
        for index, interaction in enumerate(interactions, offset):
            where = f"interactions[{index}]"
            check_id(interaction.user_id, rules.max_id_bytes, f"{where}.user_id")
            check_id(interaction.item_id, rules.max_id_bytes, f"{where}.item_id")
            if not rules.implicit:
                check_rating(interaction.rating, rules.rating_min, rules.rating_max, f"{where}.rating")
            self._users.append(interaction.user_id)
            self._items.append(interaction.item_id)
            self._ratings.append(1.0 if rules.implicit else interaction.rating)
            self._timestamps.append(interaction.timestamp)

    def dataset(self) -> Dataset:
        return number(
            np.array(self._users, dtype=object),
            np.array(self._items, dtype=object),
            np.array(self._ratings, dtype=np.float64),
            np.array(self._timestamps, dtype=np.int64),
            self._rules,
        )


def check_id(value: str, limit: int, field: str) -> None:
    if not value:
        raise InvalidArgument("is empty; every interaction needs a user_id and an item_id", field=field)
    if len(value.encode()) > limit:
        raise InvalidArgument(f"is longer than {limit} bytes (USERITEM_MAX_ID_BYTES)", field=field)


def check_rating(value: float, low: float, high: float, field: str) -> None:
    if not np.isfinite(value) or not low <= value <= high:
        raise InvalidArgument(
            f"is {value}, outside the rating scale [{low:g}, {high:g}]; fix the rating, or declare "
            "the scale in the first FitRequest (rating_min, rating_max)",
            field=field,
        )


def resolve_fit_file(fit_dir: str, path: str) -> Path:
    """`path` under the worker's fit directory; INVALID_ARGUMENT when it points outside, NOT_FOUND when
    there is no such file."""
    if not fit_dir:
        raise InvalidArgument(
            "this worker reads no files (USERITEM_FIT_DIR is empty); stream the interactions instead"
        )
    root = Path(fit_dir).resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise InvalidArgument(f"path {path!r} is outside the worker's fit directory {str(root)!r}")
    if not target.is_file():
        raise NotFound(f"no file {path!r} in the worker's fit directory {str(root)!r}")
    if target.suffix.lower() not in (".csv", ".parquet"):
        raise InvalidArgument(f"path {path!r} is neither .csv nor .parquet")
    return target


def read_file(path: Path, rules: FitRules) -> Dataset:
    """A CSV or Parquet file of columns user_id, item_id, rating (explicit fits) and timestamp (optional)."""
    needed = ["user_id", "item_id"] if rules.implicit else ["user_id", "item_id", "rating"]
    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype={"user_id": str, "item_id": str}, keep_default_na=False)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise InvalidArgument(f"cannot read {path.name}: {error}") from None
    missing = [column for column in needed if column not in frame.columns]
    if missing:
        raise InvalidArgument(
            f"{path.name} has no column {', '.join(missing)}; its columns: {', '.join(map(str, frame.columns))}"
        )
    if len(frame) > rules.max_interactions:
        raise InvalidArgument(
            f"{path.name} has {len(frame)} rows, more than {rules.max_interactions} "
            "(USERITEM_MAX_INTERACTIONS)"
        )
    users = _ids(frame["user_id"], rules.max_id_bytes, "user_id")
    items = _ids(frame["item_id"], rules.max_id_bytes, "item_id")
    if rules.implicit:
        ratings = np.ones(len(frame))
    else:
        ratings = pd.to_numeric(frame["rating"], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(ratings) | (ratings < rules.rating_min) | (ratings > rules.rating_max)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            check_rating(
                float(ratings[row]),
                rules.rating_min,
                rules.rating_max,
                f"row {row} (0-based, after the header): rating",
            )
    if "timestamp" in frame.columns:
        timestamps = pd.to_numeric(frame["timestamp"], errors="coerce").fillna(0).to_numpy(dtype=np.int64)
    else:
        timestamps = np.zeros(len(frame), dtype=np.int64)
    return number(users, items, ratings, timestamps, rules)


def _ids(column: pd.Series, limit: int, name: str) -> np.ndarray:
    missing = column.isna().to_numpy()
    values = column.astype(str).to_numpy(dtype=object, copy=True)
    values[missing] = ""  # astype(str) keeps missing values as NaN (pandas >= 3): they are empty ids
    sizes = np.fromiter((len(value.encode()) for value in values), dtype=np.int64, count=len(values))
    bad = (sizes == 0) | (sizes > limit)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        check_id(values[row], limit, f"row {row}: {name}")
    return values


def number(
    users: np.ndarray, items: np.ndarray, ratings: np.ndarray, timestamps: np.ndarray, rules: FitRules
) -> Dataset:
    """Merge duplicate (user, item) pairs (the one with the latest timestamp wins, then the one sent
    last) and number the ids in order of first appearance."""
    user_rows, user_ids = pd.factorize(users)
    item_rows, item_ids = pd.factorize(items)
    if len(user_ids) < 2 or len(item_ids) < 2:
        raise InvalidArgument(
            f"a Fit needs at least 2 users and 2 items; got {len(user_ids)} users and {len(item_ids)} items"
        )
    order = np.lexsort((np.arange(len(users)), timestamps))  # by timestamp, then by position
    pair = user_rows.astype(np.int64)[order] * len(item_ids) + item_rows[order]
    # The last of each pair in that order: unique over the reversed order keeps first occurrences.
    _, last = np.unique(pair[::-1], return_index=True)
    keep = np.sort(order[::-1][last])
    if len(keep) < rules.min_interactions:
        raise InvalidArgument(
            f"a Fit needs at least {rules.min_interactions} distinct (user, item) interactions "
            f"(USERITEM_MIN_INTERACTIONS); got {len(keep)}"
        )
    return Dataset(
        users=[str(user) for user in user_ids],
        items=[str(item) for item in item_ids],
        user_rows=user_rows[keep].astype(np.int64),
        item_rows=item_rows[keep].astype(np.int64),
        ratings=ratings[keep].astype(np.float32),
        duplicates=len(users) - len(keep),
    )
