"""Interactions in: streamed messages or a CSV/Parquet file, checked, duplicates merged, ids numbered.

Every check names the bad interaction (`interactions[i]` of the stream, or `row i` of the file) and
what to fix; nothing is trained from a Fit that fails one. Interactions are kept compactly while they
arrive (columns.py): each id once, as an int32 number per interaction, with a float32 rating and, only
once some interaction carries one, an int64 timestamp. Files are read in chunks into the same buffer,
so a file costs what the same interactions streamed cost.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow
import pyarrow.parquet as pq
from embeddings.v1 import recommender_pb2 as rec

from services.common.errors import InvalidArgument, NotFound
from services.useritem.columns import GrowingColumn, IdNumbering

CHUNK = 65_536  # interactions converted at a time (of a message, or rows of a file)


@dataclass(frozen=True)
class FitRules:
    """What one Fit accepts."""

    implicit: bool
    rating_min: float
    rating_max: float
    min_interactions: int
    max_interactions: int
    max_id_bytes: int
    max_ids: int = 2**31 - 1  # distinct users plus distinct items


@dataclass
class Dataset:
    """Distinct (user, item) pairs, numbered: users[u], items[i] are the ids of rows u and i."""

    users: list[str]
    items: list[str]
    user_rows: np.ndarray  # int32, one per interaction
    item_rows: np.ndarray  # int32
    ratings: np.ndarray  # float32 (all 1 for implicit fits)
    duplicates: int  # interactions dropped because a later one had the same (user, item)

    def __len__(self) -> int:
        return len(self.ratings)


# The name of a field of the interaction at a position, for messages: "interactions[3].rating".
Naming = Callable[[int, str], str]


def _streamed(index: int, name: str) -> str:
    return f"interactions[{index}].{name}"


class InteractionBuffer:
    """Collects a Fit's interactions, checking each as it arrives."""

    def __init__(self, rules: FitRules, naming: Naming = _streamed) -> None:
        self._rules = rules
        self._naming = naming
        self._users = IdNumbering(lambda value: id_problem(value, rules.max_id_bytes))
        self._items = IdNumbering(lambda value: id_problem(value, rules.max_id_bytes))
        self._user_rows = GrowingColumn(np.int32)
        self._item_rows = GrowingColumn(np.int32)
        self._ratings = GrowingColumn(np.float32)
        self._timestamps: GrowingColumn | None = None  # until an interaction has a timestamp

    def __len__(self) -> int:
        return len(self._user_rows)

    def add(self, interactions: Sequence[rec.Interaction]) -> None:
        """The interactions of one FitRequest."""
        for start in range(0, len(interactions), CHUNK):
            part = interactions[start : start + CHUNK]
            self.add_columns(
                [interaction.user_id for interaction in part],
                [interaction.item_id for interaction in part],
                None
                if self._rules.implicit
                else np.fromiter((i.rating for i in part), dtype=np.float64, count=len(part)),
                np.fromiter((i.timestamp for i in part), dtype=np.int64, count=len(part)),
            )

    def add_columns(
        self,
        users: Sequence[str],
        items: Sequence[str],
        ratings: np.ndarray | None,
        timestamps: np.ndarray,
    ) -> None:
        """Interactions as columns (ratings: float64, None for implicit fits; timestamps: int64)."""
        rules, offset, count = self._rules, len(self), len(users)
        if offset + count > rules.max_interactions:
            raise InvalidArgument(
                f"the Fit has more than {rules.max_interactions} interactions "
                "(USERITEM_MAX_INTERACTIONS); train on a sample, or raise the limit"
            )
        user_rows, bad_user = self._users.number(users)
        item_rows, bad_item = self._items.number(items)
        problems = [
            (position, order, self._naming(offset + position, name), description)
            for order, (name, problem) in enumerate(
                [("user_id", bad_user), ("item_id", bad_item), ("rating", self._bad_rating(ratings))]
            )
            if problem is not None
            for position, description in [problem]
        ]
        if problems:
            _, _, field, description = min(problems)
            raise InvalidArgument(description, field=field)
        if len(self._users) + len(self._items) > rules.max_ids:
            raise InvalidArgument(
                f"the Fit has more than {rules.max_ids} distinct users and items (USERITEM_MAX_IDS), "
                "more than the worker's memory is sized for; train on a sample of users or items"
            )
        self._user_rows.extend(user_rows)
        self._item_rows.extend(item_rows)
        self._ratings.extend(np.ones(count, dtype=np.float32) if ratings is None else ratings)
        if self._timestamps is None and timestamps.any():
            self._timestamps = GrowingColumn(np.int64, max(offset + count, 1024))
            self._timestamps.extend(np.zeros(offset, dtype=np.int64))
        if self._timestamps is not None:
            self._timestamps.extend(timestamps)

    def _bad_rating(self, ratings: np.ndarray | None) -> tuple[int, str] | None:
        if ratings is None:
            return None
        low, high = self._rules.rating_min, self._rules.rating_max
        bad = np.flatnonzero(~np.isfinite(ratings) | (ratings < low) | (ratings > high))
        if not len(bad):
            return None
        return int(bad[0]), rating_problem(float(ratings[bad[0]]), low, high)

    def dataset(self) -> Dataset:
        """The interactions collected, duplicates merged (the buffer is spent)."""
        return number(
            self._users.ids(),
            self._items.ids(),
            self._user_rows.values(),
            self._item_rows.values(),
            self._ratings.values(),
            None if self._timestamps is None else self._timestamps.values(),
            self._rules,
        )


def id_problem(value: str, limit: int) -> str | None:
    if not value:
        return "is empty; every interaction needs a user_id and an item_id"
    if len(value.encode()) > limit:
        return f"is longer than {limit} bytes (USERITEM_MAX_ID_BYTES)"
    return None


def rating_problem(value: float, low: float, high: float) -> str:
    return (
        f"is {value}, outside the rating scale [{low:g}, {high:g}]; fix the rating, or declare "
        "the scale in the first FitRequest (rating_min, rating_max)"
    )


def check_rating(value: float, low: float, high: float, field: str) -> None:
    if not np.isfinite(value) or not low <= value <= high:
        raise InvalidArgument(rating_problem(value, low, high), field=field)


def shown_path(path: str) -> str:
    """`path` as messages name it: as the caller gave it when relative; an absolute one is not repeated
    (it would spell out the worker's directories for whoever reads the message)."""
    return repr(path) if not Path(path).is_absolute() else "(an absolute path, not repeated here)"


def resolve_fit_file(fit_dir: str, path: str) -> Path:
    """`path` under the worker's fit directory; INVALID_ARGUMENT when it points outside, NOT_FOUND when
    there is no such file. Messages name the path as the caller gave it (see shown_path), never the
    directory."""
    if not fit_dir:
        raise InvalidArgument(
            "this worker reads no files (USERITEM_FIT_DIR is empty); stream the interactions instead"
        )
    root = Path(fit_dir).resolve()
    target = (root / path).resolve()
    shown = shown_path(path)
    if not target.is_relative_to(root):
        raise InvalidArgument(
            f"path {shown} is outside the worker's fit directory (USERITEM_FIT_DIR); give a path relative to it"
        )
    if not target.is_file():
        raise NotFound(f"no file {shown} in the worker's fit directory (USERITEM_FIT_DIR)")
    if target.suffix.lower() not in (".csv", ".parquet"):
        raise InvalidArgument(f"path {shown} is neither .csv nor .parquet")
    return target


def read_file(path: Path, rules: FitRules, given: str = "") -> Dataset:
    """A CSV or Parquet file of columns user_id, item_id, rating (explicit fits) and timestamp (optional),
    read in chunks. Messages call the file by `given`, the caller's path for it, when that is relative,
    else by its file name.

    The file is opened here and handed to the readers as an open file, so that no reader's error names
    the worker's path; an OSError is reported by its description only."""
    shown = given if given and not Path(given).is_absolute() else path.name
    needed = ["user_id", "item_id"] if rules.implicit else ["user_id", "item_id", "rating"]
    buffer = InteractionBuffer(rules, _file_naming)
    try:
        with path.open("rb") as file:
            chunks, columns, rows = _chunks(file, path.suffix.lower() == ".parquet", needed)
            missing = [column for column in needed if column not in columns]
            if missing:
                raise InvalidArgument(
                    f"{shown} has no column {', '.join(missing)}; its columns: {', '.join(columns)}"
                )
            if rows is not None and rows > rules.max_interactions:
                _too_long(shown, rows, rules)
            for chunk in chunks:
                if len(buffer) + len(chunk) > rules.max_interactions:
                    _too_long(shown, len(buffer) + len(chunk) + sum(len(rest) for rest in chunks), rules)
                buffer.add_columns(*_columns(chunk, rules))
    except OSError as error:
        raise InvalidArgument(f"cannot read {shown}: {error.strerror or type(error).__name__}") from None
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pyarrow.ArrowException) as error:
        raise InvalidArgument(f"cannot read {shown}: {str(error).replace(str(path), shown)}") from None
    return buffer.dataset()


def _file_naming(row: int, name: str) -> str:
    if name == "rating":
        return f"row {row} (0-based, after the header): rating"
    return f"row {row}: {name}"


def _too_long(shown: str, rows: int, rules: FitRules) -> None:
    raise InvalidArgument(
        f"{shown} has {rows} rows, more than {rules.max_interactions} (USERITEM_MAX_INTERACTIONS)"
    )


def _chunks(
    file: BinaryIO, parquet: bool, needed: list[str]
) -> tuple[Iterator[pd.DataFrame], list[str], int | None]:
    """The file's chunks of at most CHUNK rows (the needed columns and timestamp, if there), its
    column names and, where the format says it up front, its row count."""
    if parquet:
        table = pq.ParquetFile(file)
        columns = list(table.schema_arrow.names)
        wanted = [column for column in [*needed, "timestamp"] if column in columns]
        batches = table.iter_batches(batch_size=CHUNK, columns=wanted)
        return (batch.to_pandas() for batch in batches), columns, table.metadata.num_rows
    columns = [str(column) for column in pd.read_csv(file, nrows=0).columns]
    file.seek(0)
    wanted = [column for column in [*needed, "timestamp"] if column in columns]
    reader = pd.read_csv(
        file,
        usecols=wanted,
        dtype={"user_id": str, "item_id": str},
        keep_default_na=False,
        chunksize=CHUNK,
    )
    return iter(reader), columns, None


def _columns(
    chunk: pd.DataFrame, rules: FitRules
) -> tuple[list[str], list[str], np.ndarray | None, np.ndarray]:
    ratings = None
    if not rules.implicit:
        ratings = pd.to_numeric(chunk["rating"], errors="coerce").to_numpy(dtype=np.float64)
    if "timestamp" in chunk.columns:
        stamps = pd.to_numeric(chunk["timestamp"], errors="coerce").fillna(0).to_numpy(dtype=np.int64)
    else:
        stamps = np.zeros(len(chunk), dtype=np.int64)
    return _ids(chunk["user_id"]), _ids(chunk["item_id"]), ratings, stamps


def _ids(column: pd.Series) -> list[str]:
    missing = column.isna().to_numpy()
    values = column.astype(str).to_numpy(dtype=object, copy=True)
    values[missing] = ""  # astype(str) keeps missing values as NaN (pandas >= 3): they are empty ids
    return values.tolist()


def number(
    users: list[str],
    items: list[str],
    user_rows: np.ndarray,
    item_rows: np.ndarray,
    ratings: np.ndarray,
    timestamps: np.ndarray | None,
    rules: FitRules,
) -> Dataset:
    """Merge duplicate (user, item) pairs (the one with the latest timestamp wins, then the one sent
    last); ids are numbered in order of first appearance already."""
    if len(users) < 2 or len(items) < 2:
        raise InvalidArgument(
            f"a Fit needs at least 2 users and 2 items; got {len(users)} users and {len(items)} items"
        )
    # By timestamp, then by position (a stable sort); without timestamps, by position.
    order = None if timestamps is None else np.argsort(timestamps, kind="stable")
    pair = user_rows.astype(np.int64) * len(items) + item_rows
    if order is not None:
        pair = pair[order]
    # The last of each pair in that order: after a stable sort by pair, the last of each run.
    by_pair = np.argsort(pair, kind="stable")
    pair = pair[by_pair]
    last = np.flatnonzero(np.append(pair[1:] != pair[:-1], True))
    del pair
    keep = by_pair[last] if order is None else order[by_pair[last]]
    keep.sort()
    if len(keep) < rules.min_interactions:
        raise InvalidArgument(
            f"a Fit needs at least {rules.min_interactions} distinct (user, item) interactions "
            f"(USERITEM_MIN_INTERACTIONS); got {len(keep)}"
        )
    return Dataset(
        users=users,
        items=items,
        user_rows=user_rows[keep],
        item_rows=item_rows[keep],
        ratings=ratings[keep],
        duplicates=len(user_rows) - len(keep),
    )
