"""The user-item worker through the gateway, with real processes: a user-item worker (its own data and fit
directories) behind a gateway with no encoder workers, on the session's redis-server. Explicit ratings
with planted latent factors: Fit from a stream and from CSV/Parquet files, recommendations that find the
planted favourites, fold-in of a new user, restarts (SIGTERM and kill -9) that serve the same version,
failed and cancelled Fits that leave the serving version alone, one Fit at a time, bad input, and the
worker down."""

import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias, TypeVar

import grpc
import numpy as np
import pandas as pd
import pytest
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc, gateway_pb2_grpc
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb

from harness.processes import RedisServer, Service, gateway, running, useritem_worker
from services.common.vectors import from_wire
from tests.helpers import metric

pytestmark = pytest.mark.integration

T = TypeVar("T")
Stub: TypeAlias = gateway_pb2_grpc.GatewayStub

USERS, ITEMS, PLANTED_FACTORS, PER_USER, NOISE, DUPLICATES = 200, 100, 6, 30, 0.3, 7
FACTORS, EPOCHS = 8, 40
WORKER_ENV = {
    "USERITEM_DEFAULT_KIND": "mf",  # a matrix factorisation worker (EASE: test_useritem_ranking.py)
    "USERITEM_FACTORS": str(FACTORS),
    "USERITEM_EPOCHS": str(EPOCHS),
    "USERITEM_LEARNING_RATE": "0.05",
    "USERITEM_BATCH_SIZE": "512",
    "USERITEM_L2": "0.05",
    "USERITEM_TORCH_THREADS": "2",
    "USERITEM_SHUTDOWN_GRACE_S": "5",
}
# Quick reconnects: the gateway reaches a restarted worker at once.
GATEWAY_ENV = {"GATEWAY_MODEL_REFRESH_S": "1", "GATEWAY_WORKER_RECONNECT_MAX_S": "0.2"}
DEFAULT_MODEL = "mf"
TRIES = 10  # of each refused Fit stream (see test_a_failed_fit_names_the_interaction_...)

# Measured (2 cores, seeded, so the same each run): validation RMSE 0.437 at noise 0.3 (predicting the
# mean: ~0.99); precision@10 against the planted top unseen items 0.785 (random: 10/70 ~ 0.14); mean
# planted cosine of an item's 5 nearest items 0.72 (random ~0); fold-in overlap@10 with the trained user
# 0.93, cosine of the two user vectors 0.986.
MAX_RMSE = 2.0 * NOISE
MIN_PRECISION_AT_10 = 0.5
MIN_FOLD_IN_OVERLAP = 0.6
MIN_FOLD_IN_COSINE = 0.8
MIN_NEIGHBOUR_COSINE = 0.4


# --- data ------------------------------------------------------------------------------------------------


def user_id(row: int) -> str:
    return f"user-{row}"


def item_id(row: int) -> str:
    return f"item-{row}"


def item_number(item: str) -> int:
    return int(item.rsplit("-", 1)[1])


@dataclass(frozen=True)
class Planted:
    """Explicit ratings from planted user and item factors: rating = clip(3 + dot + noise, 0.5, 5)."""

    users: np.ndarray  # [USERS, PLANTED_FACTORS]
    items: np.ndarray  # [ITEMS, PLANTED_FACTORS]
    stream: list[tuple[str, str, float]]  # in sending order, re-rated pairs (duplicates) at the end
    ratings: dict[tuple[str, str], float]  # distinct pairs, the last rating of each

    def seen(self, user: int) -> set[int]:
        return {item_number(item) for (u, item) in self.ratings if u == user_id(user)}

    def of_user(self, user: int) -> list[tuple[str, float]]:
        return [(item, rating) for (u, item), rating in self.ratings.items() if u == user_id(user)]

    def top_unseen(self, user: int, k: int) -> set[int]:
        seen = self.seen(user)
        order = [int(row) for row in np.argsort(-(self.items @ self.users[user])) if int(row) not in seen]
        return set(order[:k])


def make_planted(seed: int = 7) -> Planted:
    rng = np.random.default_rng(seed)
    scale = PLANTED_FACTORS**-0.25  # dot products of unit variance
    users = rng.standard_normal((USERS, PLANTED_FACTORS)) * scale
    items = rng.standard_normal((ITEMS, PLANTED_FACTORS)) * scale

    def rating(user: int, item: int) -> float:
        return round(float(np.clip(3.0 + users[user] @ items[item] + rng.normal(0.0, NOISE), 0.5, 5.0)), 2)

    pairs = [
        (user, int(item)) for user in range(USERS) for item in rng.choice(ITEMS, PER_USER, replace=False)
    ]
    stream = [(user_id(user), item_id(item), rating(user, item)) for user, item in pairs]
    for index in rng.choice(len(pairs), DUPLICATES, replace=False):
        user, item = pairs[index]
        stream.append((user_id(user), item_id(item), rating(user, item)))  # rated again: this one wins
    ratings = {(user, item): value for user, item, value in stream}
    return Planted(users, items, stream, ratings)


def interactions(rows: list[tuple[str, str, float]]) -> list[rec.Interaction]:
    return [rec.Interaction(user_id=user, item_id=item, rating=rating) for user, item, rating in rows]


def fit_requests(
    rows: list[tuple[str, str, float]], per_message: int = 1000, **first: object
) -> list[rec.FitRequest]:
    """The rows as a Fit stream of several messages; `first` sets fields of the first message."""
    chunks = [rows[start : start + per_message] for start in range(0, len(rows), per_message)] or [[]]
    requests = [rec.FitRequest(interactions=interactions(chunk)) for chunk in chunks]
    for name, value in first.items():
        setattr(requests[0], name, value)
    return requests


# --- processes -------------------------------------------------------------------------------------------


@dataclass
class Cluster:
    """A user-item worker (fixed port and data dir, so a restarted one is the same worker) and a gateway."""

    worker: Service
    gateway: Service
    data_dir: Path
    fit_dir: Path
    log_dir: Path

    def restart_worker(self) -> Service:
        old = self.worker
        self.worker = useritem_worker(self.data_dir, WORKER_ENV, self.log_dir, old.port, self.fit_dir)
        self.worker.start()
        self.worker.wait_serving()
        return self.worker

    def versions_on_disk(self, model: str) -> set[str]:
        folder = self.data_dir / model
        return {path.name for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")}


PLANTED = make_planted()


@pytest.fixture(scope="module")
def planted() -> Planted:
    return PLANTED


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path, redis_server: RedisServer
) -> Iterator[Cluster]:
    data_dir = tmp_path_factory.mktemp("useritem-data")
    fit_dir = tmp_path_factory.mktemp("useritem-fit")
    worker = useritem_worker(data_dir, WORKER_ENV, log_dir, fit_dir=fit_dir)
    front = gateway([], redis_server.url, GATEWAY_ENV, log_dir, useritem=worker.address)
    front.name = "gateway-useritem"
    cluster = Cluster(worker, front, data_dir, fit_dir, log_dir)
    try:
        worker.start()
        worker.wait_serving()  # before the gateway: it would otherwise start in reconnect backoff
        front.start()
        front.wait_serving()
        yield cluster
    finally:
        front.stop()
        cluster.worker.stop()  # the current process, after restarts


@pytest.fixture(scope="module")
def stub(cluster: Cluster) -> Iterator[Stub]:
    with grpc.insecure_channel(cluster.gateway.address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


@dataclass(frozen=True)
class Fitted:
    progress: list[rec.FitProgress]
    seconds: float

    @property
    def done(self) -> rec.FitProgress:
        return self.progress[-1]

    @property
    def version(self) -> str:
        return str(self.done.model.version)


@pytest.fixture(scope="module")
def fitted(stub: Stub, planted: Planted) -> Fitted:
    """The default model trained through the gateway from a stream of several messages."""
    started = time.monotonic()
    progress = list(stub.Fit(iter(fit_requests(planted.stream, per_message=1000)), timeout=120))
    return Fitted(progress, time.monotonic() - started)


# --- helpers ---------------------------------------------------------------------------------------------


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):  # a streaming call fails when read
            list(result)
    return info.value


def fit_all(stub: Stub, requests: list[rec.FitRequest]) -> list[rec.FitProgress]:
    """Every message of a Fit of `requests` (raises the error it ends with)."""
    return list(stub.Fit(iter(requests), timeout=60))


def fit_error(stub: Stub, requests: list[rec.FitRequest]) -> grpc.RpcError:
    """The error a Fit of `requests` ends with."""
    return rpc_error(lambda: fit_all(stub, requests))


def recommend(
    stub: Stub, user: str, k: int = 10, include_seen: bool = False, model: str = ""
) -> rec.RecommendResponse:
    request = rec.RecommendRequest(user_id=user, k=k, include_seen=include_seen, model=model)
    return stub.Recommend(request, timeout=10)


def similar(stub: Stub, item: str, k: int = 5) -> rec.RecommendResponse:
    return stub.SimilarItems(rec.SimilarItemsRequest(item_id=item, k=k), timeout=10)


def fold_in(stub: Stub, *interactions: rec.Interaction, k: int = 5) -> rec.FoldInResponse:
    return stub.FoldIn(rec.FoldInRequest(interactions=interactions, k=k), timeout=10)


def ids(response: rec.RecommendResponse) -> list[str]:
    return [hit.id for hit in response.items]


def eventually(call: Callable[[], T], timeout: float = 20.0, retry: tuple[grpc.StatusCode, ...] = ()) -> T:
    """`call()` once it stops failing with UNAVAILABLE (or a code in `retry`), within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, *retry) or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def worker_encode(address: str, inputs: list[pb.Input], model: str = "") -> np.ndarray:
    """Raw float32 vectors straight from the worker (not through the gateway)."""
    with grpc.insecure_channel(address) as channel:
        response = encoder_pb2_grpc.EncoderStub(channel).Encode(
            enc.EncodeRequest(model=model, inputs=inputs, options=pb.EncodeOptions(normalize=False)),
            timeout=10,
        )
    return np.stack([from_wire(embedding.vector) for embedding in response.embeddings])


def all_ids() -> list[pb.Input]:
    return [pb.Input(user_id=user_id(u)) for u in range(USERS)] + [
        pb.Input(item_id=item_id(i)) for i in range(ITEMS)
    ]


# --- before any Fit --------------------------------------------------------------------------------------


def test_recommend_before_any_fit_asks_for_a_fit(
    tmp_path: Path, log_dir: Path, redis_server: RedisServer
) -> None:
    """On a worker of its own, which nothing has trained (the module's worker may be, whatever ran first)."""
    (tmp_path / "fit").mkdir()
    worker = useritem_worker(tmp_path / "data", WORKER_ENV, log_dir, fit_dir=tmp_path / "fit")
    worker.name = "useritem-untrained"
    with running(worker):
        front = gateway([], redis_server.url, GATEWAY_ENV, log_dir, useritem=worker.address)
        front.name = "gateway-untrained"
        with running(front), grpc.insecure_channel(front.address) as channel:
            untrained = gateway_pb2_grpc.GatewayStub(channel)
            error = rpc_error(lambda: recommend(untrained, user_id(0)))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
            assert "call Fit" in error.details() and repr(DEFAULT_MODEL) in error.details()
            assert not untrained.ListModels(enc.ListModelsRequest(), timeout=5).models


# --- Fit from a stream -----------------------------------------------------------------------------------


def test_fit_streams_progress_per_epoch_then_the_new_version(fitted: Fitted, planted: Planted) -> None:
    *epochs, done = fitted.progress
    assert epochs, "no progress message before the last one"
    assert [p.epoch for p in epochs] == list(range(1, len(epochs) + 1))
    assert all(not p.done and p.epochs == EPOCHS for p in epochs)
    assert all(p.train_loss > 0 and p.validation_rmse > 0 for p in epochs)
    assert not any(p.HasField("model") for p in epochs)

    assert done.done
    assert done.model.id == DEFAULT_MODEL
    assert done.model.space == f"useritem-{DEFAULT_MODEL}"
    assert re.fullmatch(r"[0-9a-f]{16}", done.model.version), done.model.version
    # The re-rated pairs count once.
    assert len(planted.stream) == USERS * PER_USER + DUPLICATES
    assert (done.interactions, done.users, done.items) == (len(planted.ratings), USERS, ITEMS)
    assert done.interactions == USERS * PER_USER
    # The done message reports the best epoch, the one with the lowest validation RMSE.
    best = min(epochs, key=lambda p: p.validation_rmse)
    assert done.epoch == best.epoch and done.validation_rmse == pytest.approx(best.validation_rmse)
    print(
        f"\nMEASURED fit: {len(epochs)} epochs in {fitted.seconds:.1f}s, best {done.epoch}, "
        f"validation RMSE {done.validation_rmse:.3f} (noise {NOISE}), recall@10 {done.validation_recall_at_10:.3f}"
    )
    # Near the noise: neither below it (it would be measured on training data) nor near the spread of
    # the ratings (the model learnt nothing).
    spread = float(np.std(list(planted.ratings.values())))
    assert 0.8 * NOISE < done.validation_rmse < MAX_RMSE < spread / 1.5
    assert done.validation_recall_at_10 > 0


# --- serving through the gateway -------------------------------------------------------------------------


def test_recommendations_find_the_planted_favourites_and_skip_seen_items(
    stub: Stub, planted: Planted, fitted: Fitted
) -> None:
    precisions = []
    for user in range(USERS):
        response = recommend(stub, user_id(user), k=10)
        assert response.model.version == fitted.version and response.model.id == DEFAULT_MODEL
        got = [item_number(item) for item in ids(response)]
        assert len(got) == 10 and not set(got) & planted.seen(user), f"user {user} got seen items"
        scores = [hit.score for hit in response.items]
        assert scores == sorted(scores, reverse=True)
        assert all(hit.kind == pb.INPUT_KIND_ITEM for hit in response.items)
        precisions.append(len(set(got) & planted.top_unseen(user, 10)) / 10)
    precision = float(np.mean(precisions))
    print(f"\nMEASURED precision@10 {precision:.3f} (random ~{10 / (ITEMS - PER_USER):.2f})")
    assert precision > MIN_PRECISION_AT_10


def test_include_seen_ranks_every_item_and_the_default_only_the_unseen(
    stub: Stub, planted: Planted, fitted: Fitted
) -> None:
    with_seen_in_top_10 = 0
    for user in range(10):
        unseen = recommend(stub, user_id(user), k=ITEMS)
        everything = recommend(stub, user_id(user), k=ITEMS, include_seen=True)
        seen = planted.seen(user)
        assert {item_number(item) for item in ids(unseen)} == set(range(ITEMS)) - seen
        assert {item_number(item) for item in ids(everything)} == set(range(ITEMS))
        # One ranking: the unseen items keep their order when the seen ones are let in.
        assert [item for item in ids(everything) if item_number(item) not in seen] == ids(unseen)
        top = recommend(stub, user_id(user), k=10, include_seen=True)
        with_seen_in_top_10 += bool({item_number(item) for item in ids(top)} & seen)
    assert with_seen_in_top_10 >= 5


def test_similar_items_are_planted_neighbours(
    cluster: Cluster, stub: Stub, planted: Planted, fitted: Fitted
) -> None:
    unit = planted.items / np.linalg.norm(planted.items, axis=1, keepdims=True)
    vectors = worker_encode(cluster.worker.address, [pb.Input(item_id=item_id(i)) for i in range(ITEMS)])
    learnt = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosines = []
    for item in range(20):
        response = similar(stub, item_id(item))
        assert response.model.version == fitted.version
        neighbours = [item_number(hit) for hit in ids(response)]
        assert len(neighbours) == 5 and item not in neighbours
        # Scores are cosines of the item vectors the worker encodes.
        expected = learnt[neighbours] @ learnt[item]
        assert [hit.score for hit in response.items] == pytest.approx(expected.tolist(), abs=1e-4)
        cosines.append(float(np.mean(unit[neighbours] @ unit[item])))
    mean = float(np.mean(cosines))
    print(f"\nMEASURED mean planted cosine of the 5 nearest items {mean:.3f} (random ~0)")
    assert mean > MIN_NEIGHBOUR_COSINE


def test_encode_through_the_gateway_gives_the_workers_vectors_then_caches_them(
    cluster: Cluster, stub: Stub, fitted: Fitted
) -> None:
    inputs = [pb.Input(user_id=user_id(3)), pb.Input(item_id=item_id(5)), pb.Input(user_id=user_id(4))]
    request = enc.EncodeRequest(model=DEFAULT_MODEL, inputs=inputs, options=pb.EncodeOptions(normalize=False))
    direct = worker_encode(cluster.worker.address, inputs, DEFAULT_MODEL)
    assert direct.shape == (3, FACTORS) and direct.dtype == np.float32

    first = stub.Encode(request, timeout=10)
    assert first.model.version == fitted.version and first.model.id == DEFAULT_MODEL
    assert [e.cached for e in first.embeddings] == [False, False, False]
    assert all(e.vector.dtype == pb.DTYPE_FLOAT32 and e.vector.dim == FACTORS for e in first.embeddings)
    np.testing.assert_array_equal(np.stack([from_wire(e.vector) for e in first.embeddings]), direct)

    second = stub.Encode(request, timeout=10)
    assert [e.cached for e in second.embeddings] == [True, True, True]
    np.testing.assert_array_equal(np.stack([from_wire(e.vector) for e in second.embeddings]), direct)

    # No model named: the user-item model is the default for user ids; normalised by default.
    default = stub.Encode(enc.EncodeRequest(inputs=inputs[:1]), timeout=10)
    assert default.model.id == DEFAULT_MODEL
    np.testing.assert_allclose(
        from_wire(default.embeddings[0].vector), direct[0] / np.linalg.norm(direct[0]), rtol=1e-5
    )


def test_list_models_through_the_gateway_lists_the_trained_model(stub: Stub, fitted: Fitted) -> None:
    models = {model.id: model for model in stub.ListModels(enc.ListModelsRequest(), timeout=5).models}
    assert DEFAULT_MODEL in models, models
    model = models[DEFAULT_MODEL]
    assert model.version == fitted.version
    assert model.dimension == FACTORS
    assert model.space == f"useritem-{DEFAULT_MODEL}"
    assert list(model.input_kinds) == [pb.INPUT_KIND_USER, pb.INPUT_KIND_ITEM]


# --- fold-in ---------------------------------------------------------------------------------------------


def test_fold_in_of_a_known_users_interactions_recommends_like_that_user(
    cluster: Cluster, stub: Stub, planted: Planted, fitted: Fitted
) -> None:
    overlaps, cosines = [], []
    for user in range(20):
        rated = planted.of_user(user)
        request = rec.FoldInRequest(
            interactions=[rec.Interaction(user_id="newcomer", item_id=item, rating=r) for item, r in rated],
            k=10,
        )
        response = stub.FoldIn(request, timeout=10)
        assert response.model.version == fitted.version
        assert response.vector.dim == FACTORS
        folded = [item_number(item) for item in ids(response)]
        assert len(folded) == 10 and not set(folded) & planted.seen(user)
        trained = set(ids(recommend(stub, user_id(user), k=10)))
        overlaps.append(len(trained & set(ids(response))) / 10)
        vector = from_wire(response.vector)
        learnt = worker_encode(cluster.worker.address, [pb.Input(user_id=user_id(user))])[0]
        cosines.append(float(vector @ learnt / np.linalg.norm(vector) / np.linalg.norm(learnt)))
    overlap = float(np.mean(overlaps))
    print(
        f"\nMEASURED fold-in overlap@10 {overlap:.3f}, vector cosine {np.mean(cosines):.3f} (min {min(cosines):.3f})"
    )
    assert overlap > MIN_FOLD_IN_OVERLAP
    assert float(np.mean(cosines)) > MIN_FOLD_IN_COSINE

    # include_seen lets the fold-in's own items back in.
    rated = planted.of_user(0)
    request = rec.FoldInRequest(
        interactions=[rec.Interaction(item_id=item, rating=r) for item, r in rated],
        k=ITEMS,
        include_seen=True,
    )
    assert len(stub.FoldIn(request, timeout=10).items) == ITEMS


# --- Fit from files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CsvFitted:
    """A second model, "csvmodel", trained from a CSV file of the planted ratings of users 0-149."""

    progress: list[rec.FitProgress]
    frame: pd.DataFrame


@pytest.fixture(scope="module")
def csv_fitted(cluster: Cluster, stub: Stub, planted: Planted, fitted: Fitted) -> CsvFitted:
    subset_users = {user_id(u) for u in range(150)}
    rows = [(u, i, r) for (u, i), r in planted.ratings.items() if u in subset_users]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating"])
    (cluster.fit_dir / "ratings").mkdir()
    frame.to_csv(cluster.fit_dir / "ratings" / "subset.csv", index=False)
    progress = list(
        stub.Fit(iter([rec.FitRequest(path="ratings/subset.csv", model="csvmodel")]), timeout=120)
    )
    return CsvFitted(progress, frame)


def test_fit_from_csv_and_parquet_trains_a_second_model(
    cluster: Cluster, stub: Stub, planted: Planted, fitted: Fitted, csv_fitted: CsvFitted
) -> None:
    from_csv, frame = csv_fitted.progress, csv_fitted.frame
    rows = list(frame.itertuples(index=False))
    frame.assign(timestamp=np.arange(len(frame), dtype=np.int64) + 1_700_000_000).to_parquet(
        cluster.fit_dir / "subset.parquet"
    )
    done = from_csv[-1]
    assert done.done and len(from_csv) > 1
    assert done.model.id == "csvmodel" and done.model.space == "useritem-csvmodel"
    assert (done.interactions, done.users, done.items) == (len(rows), 150, len(frame["item_id"].unique()))
    assert done.validation_rmse < MAX_RMSE

    from_parquet = list(
        stub.Fit(iter([rec.FitRequest(path="subset.parquet", model="csvmodel")]), timeout=120)
    )
    # The same interactions from either format: the same data, so (training is seeded) the same version.
    assert from_parquet[-1].model.version == done.model.version
    assert from_parquet[-1].interactions == len(rows)

    # A model of its own: its users only; the default model still serves its version.
    response = recommend(stub, user_id(10), model="csvmodel")
    assert response.model.id == "csvmodel" and response.model.version == done.model.version
    assert not {item_number(item) for item in ids(response)} & planted.seen(10)
    error = rpc_error(lambda: recommend(stub, user_id(199), model="csvmodel"))
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    assert recommend(stub, user_id(199)).model.version == fitted.version
    listed = {m.id: m.version for m in stub.ListModels(enc.ListModelsRequest(), timeout=5).models}
    # (other tests may have fitted models of their own by now)
    assert (listed[DEFAULT_MODEL], listed["csvmodel"]) == (fitted.version, done.model.version)


def test_fit_from_a_file_outside_the_fit_dir_or_missing_is_refused(
    cluster: Cluster, stub: Stub, fitted: Fitted
) -> None:
    outside = cluster.fit_dir.parent / "outside.csv"
    outside.write_text("user_id,item_id,rating\n" + "".join(f"u{n},i{n % 3},3\n" for n in range(30)))
    for path in ["../outside.csv", str(outside), "ratings/../../outside.csv"]:
        error = fit_error(stub, [rec.FitRequest(path=path, model="csvmodel")])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, error.details())
        assert "outside the worker's fit directory" in error.details()

    error = fit_error(stub, [rec.FitRequest(path="missing.csv")])
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    assert "missing.csv" in error.details()
    assert recommend(stub, user_id(1)).model.version == fitted.version


# --- restarts --------------------------------------------------------------------------------------------


def test_a_restarted_worker_serves_the_same_version_and_vectors(
    cluster: Cluster, stub: Stub, fitted: Fitted, planted: Planted
) -> None:
    # a second model, fitted here (no other test's model is relied on), of the other kind: EASE
    ease = fit_all(stub, fit_requests(planted.stream, model="restarted-ease", kind=rec.MODEL_KIND_EASE))[-1]
    assert ease.kind == rec.MODEL_KIND_EASE
    before = worker_encode(cluster.worker.address, all_ids())
    ease_top = recommend(stub, user_id(0), model="restarted-ease")

    for how in ("SIGTERM", "SIGKILL"):
        old = cluster.worker
        if how == "SIGTERM":
            old.stop()
            assert old.popen is not None and old.popen.returncode == 0, old.log_tail()
        else:
            old.kill()
            assert old.popen is not None and old.popen.returncode == -signal.SIGKILL
        cluster.restart_worker()

        response = eventually(lambda: recommend(stub, user_id(2)))
        assert response.model.version == fitted.version, how
        assert recommend(stub, user_id(0), model="restarted-ease") == ease_top, how
        np.testing.assert_array_equal(worker_encode(cluster.worker.address, all_ids()), before)
    assert cluster.versions_on_disk(DEFAULT_MODEL) == {fitted.version}


# --- failed Fits -----------------------------------------------------------------------------------------


def test_a_failed_fit_names_the_interaction_and_keeps_the_serving_version(
    cluster: Cluster, stub: Stub, planted: Planted, fitted: Fitted
) -> None:
    rows = planted.stream[:400]  # 20 messages of 20

    nan = fit_requests(rows, per_message=20)
    nan[2].interactions[4].rating = float("nan")  # interactions[44] of the stream
    out_of_scale = fit_requests(rows, per_message=20)
    out_of_scale[0].interactions[3].rating = 7.5
    declared = fit_requests(rows, per_message=20, rating_min=0.5, rating_max=10.0)
    declared[0].interactions[3].rating = 7.5  # inside the declared scale: accepted
    declared[5].interactions[0].rating = 12.0  # interactions[100]: outside it
    cases = [
        (nan, ["interactions[44].rating", "nan"]),
        (out_of_scale, ["interactions[3].rating", "7.5", "[0.5, 5]"]),
        (declared, ["interactions[100].rating", "12", "[0.5, 10]"]),
        (fit_requests(rows[:200:20]), ["at least 20 distinct", "got 10"]),
        (fit_requests([(user_id(0), item_id(1), 3.0)] * 30), ["at least 2 users and 2 items"]),
    ]
    for requests, phrases in cases:
        # Several tries: a worker that refused a stream while the gateway was still forwarding it used to
        # reach the caller as INTERNAL "Internal error from Core" about half the time (grpc/grpc#36066).
        for _ in range(TRIES):
            call = stub.Fit(iter(requests), timeout=60)
            received: list[rec.FitProgress] = []
            with pytest.raises(grpc.RpcError) as info:
                received.extend(call)
            error = info.value
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            for phrase in phrases:
                assert phrase in error.details(), (phrase, error.details())
            assert not received, "a Fit refused for its input trained anyway"
        assert recommend(stub, user_id(7)).model.version == fitted.version
    assert cluster.versions_on_disk(DEFAULT_MODEL) == {fitted.version}


# --- cancelled and concurrent Fits -----------------------------------------------------------------------


LONG_ENV = {
    **WORKER_ENV,
    "USERITEM_EPOCHS": "300",
    "USERITEM_PATIENCE": "300",
    "USERITEM_BATCH_SIZE": "128",
}


def small_rows(seed: int) -> list[tuple[str, str, float]]:
    """40 interactions: 300 epochs of one batch each train in about a second."""
    rng = np.random.default_rng(seed)
    return [(f"s{n % 8}", f"t{n // 8}", float(rng.integers(1, 6))) for n in range(40)]


def large_rows() -> list[tuple[str, str, float]]:
    """20k interactions: 300 epochs of ~140 batches each, far longer than the test waits."""
    rng = np.random.default_rng(11)
    users, items = rng.integers(0, 1000, 20_000), rng.integers(0, 400, 20_000)
    return [(f"big{u}", f"thing{i}", float(rng.integers(1, 6))) for u, i in zip(users, items, strict=True)]


def test_a_cancelled_fit_keeps_the_serving_version_and_one_fit_runs_at_a_time(
    tmp_path: Path, log_dir: Path, redis_server: RedisServer
) -> None:
    worker = useritem_worker(tmp_path / "data", LONG_ENV, log_dir)
    worker.name = "useritem-long"
    front = gateway([], redis_server.url, GATEWAY_ENV, log_dir, useritem=worker.address)
    front.name = "gateway-useritem-long"
    try:
        worker.start()
        worker.wait_serving()
        front.start()
        front.wait_serving()
        with grpc.insecure_channel(front.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            serving = fit_all(stub, fit_requests(small_rows(1)))[-1].model.version
            assert recommend(stub, "s1").model.version == serving

            long_fit = stub.Fit(iter(fit_requests(large_rows(), per_message=5000)), timeout=120)
            first = next(long_fit)
            assert not first.done and first.epoch == 1 and first.epochs == 300

            # A second Fit while the first trains: refused (every try), the first goes on.
            for _ in range(TRIES):
                error = fit_error(stub, fit_requests(small_rows(2) * 10, per_message=20))
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                assert "one Fit runs at a time" in error.details()
            assert not next(long_fit).done

            long_fit.cancel()
            with pytest.raises(grpc.RpcError) as cancelled:
                list(long_fit)
            assert cancelled.value.code() == grpc.StatusCode.CANCELLED

            # The cancelled Fit neither serves nor saves a version.
            assert recommend(stub, "s1").model.version == serving
            error = rpc_error(lambda: recommend(stub, "big1"))
            assert error.code() == grpc.StatusCode.NOT_FOUND
            deadline = time.monotonic() + 10
            while not metric(worker.metrics_port, "rpc_requests_total", method="Fit", code="CANCELLED"):
                assert time.monotonic() < deadline, "the worker never saw the Fit cancelled"
                time.sleep(0.1)

            # The worker is not left busy: a new Fit runs (once the cancelled one has wound down).
            again = eventually(
                lambda: fit_all(stub, fit_requests(small_rows(3))),
                timeout=15,
                retry=(grpc.StatusCode.RESOURCE_EXHAUSTED,),
            )
            new_version = again[-1].model.version
            assert again[-1].done and new_version != serving
            assert recommend(stub, "s1").model.version == new_version
            assert rpc_error(lambda: recommend(stub, "big1")).code() == grpc.StatusCode.NOT_FOUND
            versions = {p.name for p in (tmp_path / "data" / DEFAULT_MODEL).iterdir() if p.is_dir()}
            assert versions == {serving, new_version}
    finally:
        front.stop()
        worker.stop()


# --- bad input -------------------------------------------------------------------------------------------


SOME_ROWS = PLANTED.stream[:30]  # valid interactions for the Fits below
KNOWN_ITEM, KNOWN_RATING = SOME_ROWS[0][1], SOME_ROWS[0][2]
NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
BAD_INPUT: dict[str, tuple[Callable[[Stub], object], grpc.StatusCode, list[str]]] = {
    "unknown user": (lambda stub: recommend(stub, "nobody"), NOT_FOUND, ["user_id 'nobody'", "FoldIn"]),
    "unknown item": (lambda stub: similar(stub, "nothing"), NOT_FOUND, ["item_id 'nothing'"]),
    "k=0": (lambda stub: recommend(stub, user_id(0), k=0), INVALID, ["k=0", "1..1000"]),
    "k=1001": (lambda stub: recommend(stub, user_id(0), k=1001), INVALID, ["k=1001", "1..1000"]),
    "similar k=0": (lambda stub: similar(stub, item_id(0), k=0), INVALID, ["k=0", "1..1000"]),
    "unknown model": (
        lambda stub: recommend(stub, user_id(0), model="nope"),
        INVALID,
        ["unknown model 'nope'", DEFAULT_MODEL],
    ),
    "empty user_id": (lambda stub: recommend(stub, ""), INVALID, ["user_id is empty"]),
    "fold-in unknown item": (
        lambda stub: fold_in(
            stub,
            rec.Interaction(item_id=KNOWN_ITEM, rating=KNOWN_RATING),
            rec.Interaction(item_id="ghost", rating=3),
        ),
        NOT_FOUND,
        ["'ghost'", "leave them out"],
    ),
    "fold-in of nothing": (lambda stub: fold_in(stub), INVALID, ["1 to 1024 interactions", "got 0"]),
    "fold-in rating off the scale": (
        lambda stub: fold_in(stub, rec.Interaction(item_id=KNOWN_ITEM, rating=9)),
        INVALID,
        ["interactions[0].rating", "[0.5, 5]"],
    ),
    "empty Fit stream": (lambda stub: fit_all(stub, []), INVALID, ["no messages"]),
    "Fit of model '../x'": (
        lambda stub: fit_all(stub, fit_requests(SOME_ROWS, model="../x")),
        INVALID,
        ["model name '../x' is not valid"],
    ),
    "Fit with a path and interactions": (
        lambda stub: fit_all(stub, fit_requests(SOME_ROWS, path="subset.parquet")),
        INVALID,
        ["both a path and interactions"],
    ),
    "Fit with rating_min = rating_max": (
        lambda stub: fit_all(stub, fit_requests(SOME_ROWS, rating_min=3.0, rating_max=3.0)),
        INVALID,
        ["rating scale [3, 3] is not valid"],
    ),
    "Fit with rating_min > rating_max": (
        lambda stub: fit_all(stub, fit_requests(SOME_ROWS, rating_min=5.0, rating_max=1.0)),
        INVALID,
        ["rating scale [5, 1] is not valid"],
    ),
    "Fit whose 2nd message names another model": (
        lambda stub: fit_all(stub, [*fit_requests(SOME_ROWS), rec.FitRequest(model="other")]),
        INVALID,
        ["FitRequest 1", "model", "first message"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_a_clear_status_and_the_worker_keeps_answering(
    case: str, stub: Stub, fitted: Fitted
) -> None:
    call, code, phrases = BAD_INPUT[case]
    error = rpc_error(lambda: call(stub))
    assert error.code() == code, error.details()
    for phrase in phrases:
        assert phrase in error.details(), (phrase, error.details())
    response = recommend(stub, user_id(5))
    assert response.model.version == fitted.version and len(response.items) == 10


# --- the worker down -------------------------------------------------------------------------------------


def test_recommend_answers_unavailable_while_the_worker_is_down(
    cluster: Cluster, stub: Stub, fitted: Fitted
) -> None:
    cluster.worker.kill()
    for call in (
        lambda: recommend(stub, user_id(0)),
        lambda: similar(stub, item_id(0)),
        lambda: fold_in(stub, rec.Interaction(item_id=item_id(0), rating=3)),
        lambda: fit_all(stub, fit_requests(SOME_ROWS)),
    ):
        started = time.monotonic()
        error = rpc_error(call)
        elapsed = time.monotonic() - started
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert "unavailable" in error.details() and cluster.worker.address in error.details()
        assert elapsed < 5, f"UNAVAILABLE after {elapsed:.1f}s"

    cluster.restart_worker()
    assert eventually(lambda: recommend(stub, user_id(0))).model.version == fitted.version
