"""Interactions in: a streamed Fit's checks (each naming `interactions[i]`), duplicate merging, id
numbering, and CSV/Parquet files confined to the worker's fit directory."""

import math
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from embeddings.v1 import recommender_pb2 as rec

from services.common.errors import InvalidArgument, NotFound
from services.useritem.interactions import CHUNK, InteractionBuffer, read_file, resolve_fit_file
from tests.unit.useritem_data import planted, rules


def _grid(users: int = 5, items: int = 6) -> list[rec.Interaction]:
    """Every user rates every item once: users*items distinct interactions with ratings in [1, 5]."""
    return [
        rec.Interaction(user_id=f"u{u}", item_id=f"i{i}", rating=1.0 + (u + 2 * i) % 5)
        for u in range(users)
        for i in range(items)
    ]


def _buffer(implicit: bool = False, **overrides: object) -> InteractionBuffer:
    return InteractionBuffer(rules(implicit, **overrides))


# (case, the bad interaction, message naming the field); sent as interactions[4], after 3 + 1 good ones
_BAD: list[tuple[str, rec.Interaction, str]] = [
    (
        "empty user",
        rec.Interaction(user_id="", item_id="i1", rating=3),
        r"interactions\[4\]\.user_id is empty",
    ),
    (
        "empty item",
        rec.Interaction(user_id="u1", item_id="", rating=3),
        r"interactions\[4\]\.item_id is empty",
    ),
    (
        "long user",
        rec.Interaction(user_id="u" * 65, item_id="i1", rating=3),
        r"interactions\[4\]\.user_id is longer than 64 bytes",
    ),
    (
        "long item in utf-8 bytes",  # 33 characters, 66 bytes
        rec.Interaction(user_id="u1", item_id="é" * 33, rating=3),
        r"interactions\[4\]\.item_id is longer than 64 bytes",
    ),
    (
        "nan rating",
        rec.Interaction(user_id="u1", item_id="i1", rating=math.nan),
        r"interactions\[4\]\.rating is nan, outside the rating scale \[0\.5, 5\]",
    ),
    (
        "inf rating",
        rec.Interaction(user_id="u1", item_id="i1", rating=math.inf),
        r"interactions\[4\]\.rating is inf",
    ),
    (
        "rating above the scale",
        rec.Interaction(user_id="u1", item_id="i1", rating=5.5),
        r"interactions\[4\]\.rating is 5\.5, outside the rating scale",
    ),
    (
        "missing rating (0) below the scale",
        rec.Interaction(user_id="u1", item_id="i1"),
        r"interactions\[4\]\.rating is 0\.0, outside the rating scale",
    ),
]


@pytest.mark.parametrize(("case", "bad", "message"), _BAD, ids=[case for case, _, _ in _BAD])
def test_a_bad_streamed_interaction_is_named_by_its_index_in_the_whole_stream(
    case: str, bad: rec.Interaction, message: str
) -> None:
    buffer = _buffer()
    buffer.add(_grid()[:3])  # the first message
    with pytest.raises(InvalidArgument, match=message):
        buffer.add([_grid()[3], bad])  # the second: the bad one is the stream's 5th interaction


def test_ids_at_the_byte_limit_are_accepted() -> None:
    buffer = _buffer()
    buffer.add([rec.Interaction(user_id="é" * 32, item_id="x" * 64, rating=3.0), *_grid()])
    assert "é" * 32 in buffer.dataset().users


def test_a_declared_rating_scale_replaces_the_default() -> None:
    buffer = _buffer(rating_min=-1.0, rating_max=1.0)
    grid = [rec.Interaction(user_id=i.user_id, item_id=i.item_id, rating=-0.5) for i in _grid()]
    buffer.add(grid)
    assert np.all(buffer.dataset().ratings == np.float32(-0.5))
    with pytest.raises(InvalidArgument, match=r"interactions\[30\]\.rating is 3\.0, outside .*\[-1, 1\]"):
        buffer.add([rec.Interaction(user_id="u1", item_id="i1", rating=3.0)])


def test_an_implicit_fit_ignores_the_ratings() -> None:
    buffer = _buffer(implicit=True)
    ratings = [math.nan, math.inf, -7.0, 0.0, 99.0]
    buffer.add(
        [
            rec.Interaction(user_id=i.user_id, item_id=i.item_id, rating=ratings[n % len(ratings)])
            for n, i in enumerate(_grid())
        ]
    )
    data = buffer.dataset()
    assert len(data) == 30
    assert data.ratings.dtype == np.float32
    assert np.all(data.ratings == 1.0)  # "all 1 for implicit fits", whatever was sent


def test_more_interactions_than_the_limit_are_refused_across_messages() -> None:
    buffer = _buffer(max_interactions=40)
    buffer.add(_grid()[:25])
    with pytest.raises(InvalidArgument, match=r"more than 40 interactions \(USERITEM_MAX_INTERACTIONS\)"):
        buffer.add(_grid()[:16])
    buffer.add(_grid()[:15])  # exactly at the limit is fine
    assert buffer.dataset().duplicates == 15


def test_too_few_distinct_interactions_after_merging_duplicates() -> None:
    buffer = _buffer(min_interactions=20)
    grid = _grid()  # 30 distinct
    buffer.add(grid[:15] + grid[:15])  # 30 sent, 15 distinct
    with pytest.raises(InvalidArgument, match=r"at least 20 distinct .* got 15"):
        buffer.dataset()
    exact = _buffer(min_interactions=20)
    exact.add(grid[:20] + grid[:5])
    assert len(exact.dataset()) == 20


@pytest.mark.parametrize(("users", "items"), [(1, 30), (30, 1)])
def test_a_fit_needs_two_users_and_two_items(users: int, items: int) -> None:
    buffer = _buffer()
    buffer.add(_grid(users, items))
    with pytest.raises(
        InvalidArgument, match=rf"at least 2 users and 2 items; got {users} users and {items} items"
    ):
        buffer.dataset()


def _pairs(buffer: InteractionBuffer) -> dict[tuple[str, str], float]:
    data = buffer.dataset()
    return {
        (data.users[u], data.items[i]): float(r)
        for u, i, r in zip(data.user_rows, data.item_rows, data.ratings, strict=True)
    }


def test_a_duplicate_pair_keeps_the_latest_timestamp_then_the_last_sent() -> None:
    buffer = _buffer()
    buffer.add(_grid())
    buffer.add(
        [
            # (u0, i0): the latest timestamp wins although it was sent first
            rec.Interaction(user_id="u0", item_id="i0", rating=4.0, timestamp=200),
            rec.Interaction(user_id="u0", item_id="i0", rating=2.0, timestamp=100),
            # (u1, i1): same timestamps, the last sent wins
            rec.Interaction(user_id="u1", item_id="i1", rating=2.5, timestamp=50),
            rec.Interaction(user_id="u1", item_id="i1", rating=4.5, timestamp=50),
            # (u2, i2): no timestamps at all, the last sent wins
            rec.Interaction(user_id="u2", item_id="i2", rating=0.5),
        ]
    )
    pairs = _pairs(buffer)
    assert pairs[("u0", "i0")] == 4.0
    assert pairs[("u1", "i1")] == 4.5
    assert pairs[("u2", "i2")] == 0.5
    assert pairs[("u3", "i3")] == _grid()[3 * 6 + 3].rating  # untouched pairs keep their rating
    assert len(pairs) == 30
    assert buffer.dataset().duplicates == 5


def test_ids_are_numbered_in_order_of_first_appearance() -> None:
    buffer = _buffer(min_interactions=1)
    buffer.add([rec.Interaction(user_id=f"z{n}", item_id=f"y{5 - n}", rating=3.0) for n in range(6)] * 4)
    data = buffer.dataset()
    assert data.users == [f"z{n}" for n in range(6)]
    assert data.items == [f"y{5 - n}" for n in range(6)]
    assert sorted(zip(data.user_rows.tolist(), data.item_rows.tolist(), strict=True)) == [
        (n, n) for n in range(6)
    ]
    # int32: 4 bytes per interaction and id column while the Fit trains, not 8
    assert data.user_rows.dtype == np.int32 and data.item_rows.dtype == np.int32


# Files -----------------------------------------------------------------------------------------------


def _frame() -> pd.DataFrame:
    data = planted(users=20, items=15, per_user=6, seed=3)
    return pd.DataFrame(
        {
            "user_id": [f"u{row}" for row in data.user_rows],
            "item_id": [f"i{row}" for row in data.item_rows],
            "rating": data.ratings,
            "timestamp": np.arange(len(data.ratings)),
        }
    )


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_file_reads_like_the_same_interactions_streamed(tmp_path: Path, suffix: str) -> None:
    frame = _frame()
    # a duplicate with an older timestamp, which must lose to the row already there
    first = frame.iloc[0]
    frame = pd.concat(
        [frame, pd.DataFrame([{**first.to_dict(), "rating": 0.5, "timestamp": -1}])], ignore_index=True
    )
    path = tmp_path / f"ratings{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    from_file = read_file(path, rules())
    buffer = _buffer()
    buffer.add(
        [
            rec.Interaction(
                user_id=str(r.user_id),
                item_id=str(r.item_id),
                rating=float(r.rating),
                timestamp=int(r.timestamp),
            )
            for r in frame.itertuples()
        ]
    )
    streamed = buffer.dataset()
    assert from_file.users == streamed.users and from_file.items == streamed.items
    np.testing.assert_array_equal(from_file.user_rows, streamed.user_rows)
    np.testing.assert_array_equal(from_file.item_rows, streamed.item_rows)
    np.testing.assert_allclose(from_file.ratings, streamed.ratings, rtol=1e-6)
    assert from_file.duplicates == 1
    kept = dict(
        zip(zip(from_file.user_rows, from_file.item_rows, strict=True), from_file.ratings, strict=True)
    )
    assert kept[(0, from_file.items.index(first["item_id"]))] == pytest.approx(first["rating"], rel=1e-6)


def test_numeric_ids_in_a_csv_stay_strings(tmp_path: Path) -> None:
    path = tmp_path / "numeric.csv"
    pd.DataFrame(
        {"user_id": ["007", "7", "007", "7"] * 6, "item_id": [f"0{n}" for n in range(24)], "rating": 3.0}
    ).to_csv(path, index=False)
    data = read_file(path, rules())
    assert data.users == ["007", "7"]
    assert data.items[0] == "00"


def test_an_implicit_file_needs_no_rating_column(tmp_path: Path) -> None:
    path = tmp_path / "clicks.csv"
    _frame()[["user_id", "item_id"]].to_csv(path, index=False)
    data = read_file(path, rules(implicit=True))
    assert len(data) == 120 and np.all(data.ratings == 1.0)
    with pytest.raises(
        InvalidArgument, match=r"clicks\.csv has no column rating; its columns: user_id, item_id"
    ):
        read_file(path, rules())


def test_a_file_without_an_id_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ratings.parquet"
    _frame().rename(columns={"item_id": "movie"}).to_parquet(path)
    with pytest.raises(InvalidArgument, match=r"ratings\.parquet has no column item_id"):
        read_file(path, rules())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", r"row 7 \(0-based, after the header\): rating is nan"),
        ("abc", r"row 7 \(0-based, after the header\): rating is nan"),
        ("7.5", r"row 7 \(0-based, after the header\): rating is 7\.5, outside the rating scale"),
    ],
)
def test_a_bad_rating_row_is_named(tmp_path: Path, value: str, message: str) -> None:
    frame = _frame().astype({"rating": str})
    frame.loc[7, "rating"] = value
    path = tmp_path / "ratings.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(InvalidArgument, match=message):
        read_file(path, rules())


def test_an_empty_id_in_a_file_is_named(tmp_path: Path) -> None:
    frame = _frame()
    frame.loc[4, "user_id"] = ""
    path = tmp_path / "ratings.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(InvalidArgument, match=r"row 4: user_id is empty"):
        read_file(path, rules())
    frame = _frame()
    frame["item_id"] = frame["item_id"].astype(object)
    frame.loc[9, "item_id"] = None
    frame.to_parquet(tmp_path / "ratings.parquet")
    with pytest.raises(InvalidArgument, match=r"row 9: item_id is empty"):
        read_file(tmp_path / "ratings.parquet", rules())


def test_a_file_longer_than_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    _frame().to_csv(path, index=False)
    with pytest.raises(InvalidArgument, match=r"ratings\.csv has 120 rows, more than 100"):
        read_file(path, rules(max_interactions=100))


def test_an_unreadable_file_is_invalid_argument(tmp_path: Path) -> None:
    path = tmp_path / "ratings.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(InvalidArgument, match=r"cannot read ratings\.parquet"):
        read_file(path, rules())


@pytest.fixture
def fit_dir(tmp_path: Path) -> Path:
    root = tmp_path / "fit"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ratings.csv").write_text("user_id,item_id,rating\n")
    (root / "ratings.txt").write_text("user_id,item_id,rating\n")
    (tmp_path / "outside.csv").write_text("user_id,item_id,rating\n")
    return root


def test_a_path_under_the_fit_dir_resolves(fit_dir: Path) -> None:
    assert resolve_fit_file(str(fit_dir), "sub/ratings.csv") == (fit_dir / "sub" / "ratings.csv").resolve()
    assert resolve_fit_file(str(fit_dir), "sub/../sub/ratings.csv").name == "ratings.csv"


@pytest.mark.parametrize(
    "path",
    ["../outside.csv", "sub/../../outside.csv", "/etc/passwd", "ABSOLUTE"],
    ids=["parent", "parent-via-sub", "absolute", "absolute-existing-csv"],
)
def test_a_path_outside_the_fit_dir_is_refused(fit_dir: Path, path: str) -> None:
    if path == "ABSOLUTE":
        path = str(fit_dir.parent / "outside.csv")
    with pytest.raises(InvalidArgument, match=r"is outside the worker's fit directory"):
        resolve_fit_file(str(fit_dir), path)


def test_a_symlink_out_of_the_fit_dir_is_refused(fit_dir: Path) -> None:
    os.symlink(fit_dir.parent / "outside.csv", fit_dir / "link.csv")
    with pytest.raises(InvalidArgument, match=r"is outside the worker's fit directory"):
        resolve_fit_file(str(fit_dir), "link.csv")


@pytest.mark.parametrize("path", ["missing.csv", "sub", "sub/missing.parquet"])
def test_a_missing_file_is_not_found(fit_dir: Path, path: str) -> None:
    with pytest.raises(NotFound, match=rf"no file '{path}' in the worker's fit directory"):
        resolve_fit_file(str(fit_dir), path)


def test_a_file_of_another_kind_is_refused(fit_dir: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"'ratings\.txt' is neither \.csv nor \.parquet"):
        resolve_fit_file(str(fit_dir), "ratings.txt")


def test_no_fit_dir_means_no_files(fit_dir: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"reads no files \(USERITEM_FIT_DIR is empty\)"):
        resolve_fit_file("", "sub/ratings.csv")


# Memory ------------------------------------------------------------------------------------------------


def _realistic(count: int, seed: int = 0) -> list[rec.FitRequest]:
    """`count` interactions of count/30 users and count/100 items (ids like real ones), in messages."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, count // 30, count), rng.integers(0, count // 100, count)
    ratings = rng.integers(1, 11, count) / 2
    return [
        rec.FitRequest(
            interactions=[
                rec.Interaction(user_id=f"user-{u}", item_id=f"item-{i}", rating=float(r))
                for u, i, r in zip(
                    users[at : at + 10_000], items[at : at + 10_000], ratings[at : at + 10_000], strict=True
                )
            ]
        )
        for at in range(0, count, 10_000)
    ]


def test_interactions_are_held_in_a_few_bytes_each() -> None:
    """Ids are kept once each and interactions as numpy columns: the buffer held 172 bytes per interaction
    when it kept Python strings and floats; now 12 bytes (two int32 numbers and a float32), up to 24 while
    a column's doubled capacity is not yet filled, plus each distinct id once."""
    count = 200_000
    messages = _realistic(count)
    buffer = _buffer(max_interactions=10 * count)
    tracemalloc.start()
    try:
        held_before = tracemalloc.get_traced_memory()[0]
        for message in messages:
            buffer.add(message.interactions)
        held = tracemalloc.get_traced_memory()[0] - held_before
        tracemalloc.reset_peak()
        data = buffer.dataset()
        numbering = tracemalloc.get_traced_memory()[1] - held_before
    finally:
        tracemalloc.stop()
    assert len(data) > 0.99 * count
    assert held / count < 32, held / count  # measured 24.2
    assert numbering / count < 80, numbering / count  # measured 60.3: the buffer, the sort, the result


def test_more_distinct_ids_than_the_limit_are_refused() -> None:
    buffer = _buffer(max_ids=11)
    buffer.add(_grid(5, 6))  # 5 users + 6 items
    with pytest.raises(InvalidArgument, match=r"more than 11 distinct users and items \(USERITEM_MAX_IDS\)"):
        buffer.add([rec.Interaction(user_id="new user", item_id="i1", rating=3.0)])


def test_a_bad_row_past_the_first_chunk_is_named_by_its_row_in_the_file(tmp_path: Path) -> None:
    rows = CHUNK + 500
    frame = pd.DataFrame(
        {
            "user_id": [f"u{n % 97}" for n in range(rows)],
            "item_id": [f"i{n % 89}" for n in range(rows)],
            "rating": 3.0,
        }
    )
    frame.loc[CHUNK + 17, "rating"] = 9.0
    path = tmp_path / "ratings.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(
        InvalidArgument, match=rf"row {CHUNK + 17} \(0-based, after the header\): rating is 9\.0"
    ):
        read_file(path, rules())
    frame.loc[CHUNK + 17, "rating"] = 3.0
    frame.loc[CHUNK + 3, "item_id"] = ""
    frame.to_parquet(tmp_path / "ratings.parquet")
    with pytest.raises(InvalidArgument, match=rf"row {CHUNK + 3}: item_id is empty"):
        read_file(tmp_path / "ratings.parquet", rules())


def test_file_messages_name_the_callers_path_never_the_workers_directories(fit_dir: Path) -> None:
    secrets = [str(fit_dir), str(fit_dir.resolve()), str(fit_dir.parent)]
    (fit_dir / "folder.csv").mkdir()
    (fit_dir / "broken.parquet").write_bytes(b"PAR1 and then nothing")
    messages = []
    for path in [
        "../outside.csv",
        str(fit_dir.parent / "outside.csv"),
        "missing.csv",
        "folder.csv",
        "ratings.txt",
    ]:
        with pytest.raises((InvalidArgument, NotFound)) as refused:
            resolve_fit_file(str(fit_dir), path)
        messages.append(refused.value.message)
    for path in [fit_dir / "broken.parquet", fit_dir / "folder.csv"]:  # a reader's error, an OSError
        with pytest.raises(InvalidArgument, match=rf"cannot read {path.name}") as unreadable:
            read_file(path, rules())
        messages.append(unreadable.value.message)
    assert "Is a directory" in messages[-1]
    leaks = [message for message in messages if any(secret in message for secret in secrets)]
    assert not leaks, leaks
    assert (
        "'../outside.csv' is outside" in messages[0]
        and "(an absolute path, not repeated here)" in messages[1]
    )
