"""Hostile Fits against real processes: a user-item worker (its own data and fit directories, on a fixed
port so that a restarted one is the same worker) behind a gateway, on the session's redis-server.

Callers that stall (the Fit ends ABORTED after USERITEM_FIT_IDLE_TIMEOUT_S and the slot is free), that
leave at every step of a Fit, a worker killed with SIGKILL at every step, training that diverges, rating
scales training cannot use, and messages that must name no path of the worker and no other caller's
model. After each: what serves in memory is what CURRENT names on disk, also after a restart, and a Fit
that failed or was cancelled before its promotion changed nothing (README, "Recommendations": once
promotion has started it completes)."""

import hashlib
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc, gateway_pb2_grpc, recommender_pb2_grpc
from embeddings.v1 import recommender_pb2 as rec

from harness.processes import RedisServer, Service, gateway, useritem_worker

pytestmark = pytest.mark.integration

T = TypeVar("T")

IDLE_S = 2.0  # USERITEM_FIT_IDLE_TIMEOUT_S of the worker here
EPOCHS = 5  # every Fit runs exactly this many epochs (patience beyond them): a progress message each
WORKER_ENV = {
    "USERITEM_DEFAULT_KIND": "mf",  # epochs to stall and diverge in (EASE: test_useritem_ranking.py)
    "USERITEM_FACTORS": "4",
    "USERITEM_EPOCHS": str(EPOCHS),
    "USERITEM_PATIENCE": "100",
    "USERITEM_BATCH_SIZE": "64",
    "USERITEM_TORCH_THREADS": "1",
    "USERITEM_SHUTDOWN_GRACE_S": "2",
    "USERITEM_FIT_IDLE_TIMEOUT_S": str(IDLE_S),
}
GATEWAY_ENV = {"GATEWAY_MODEL_REFRESH_S": "1", "GATEWAY_WORKER_RECONNECT_MAX_S": "0.2"}
WAIT_S = 30.0  # generous deadlines for what takes well under a second on an idle machine
SECRET_MODEL = "alices-secret-model"  # a model another caller trains: no message may name it


def ratings(seed: int, users: int = 40, items: int = 12, per_user: int = 6) -> list[tuple[str, str, float]]:
    """`per_user` ratings (1 to 5, seeded) of distinct items by each user."""
    rng = np.random.default_rng(seed)
    return [
        (f"u{user}", f"i{int(item)}", float(rng.integers(1, 6)))
        for user in range(users)
        for item in rng.choice(items, per_user, replace=False)
    ]


def large(seed: int) -> list[tuple[str, str, float]]:
    """30,000 ratings: an epoch takes about half a second (batches of 64), so a caller or a kill that acts
    two epochs before the end acts seconds before promotion could start."""
    return ratings(seed, users=1000, items=200, per_user=30)


def requests(
    rows: list[tuple[str, str, float]], per_message: int = 5000, **first: object
) -> list[rec.FitRequest]:
    messages = [
        rec.FitRequest(
            interactions=[
                rec.Interaction(user_id=u, item_id=i, rating=r) for u, i, r in rows[at : at + per_message]
            ]
        )
        for at in range(0, len(rows), per_message)
    ]
    for name, value in first.items():
        setattr(messages[0], name, value)
    return messages


# --- processes and what they hold ------------------------------------------------------------------------


@dataclass
class Cluster:
    worker: Service
    gateway: Service
    data_dir: Path
    fit_dir: Path
    log_dir: Path
    channels: list[grpc.Channel] = field(default_factory=list)

    def start_worker(self, env: dict[str, str] | None = None) -> None:
        self.worker = useritem_worker(
            self.data_dir, {**WORKER_ENV, **(env or {})}, self.log_dir, self.worker.port, self.fit_dir
        )
        self.worker.name = "useritem-hostile"
        self.worker.start()
        self.worker.wait_serving()

    def restart_worker(self, how: str = "SIGKILL", env: dict[str, str] | None = None) -> None:
        """Stop the worker (SIGKILL or SIGTERM), start it again, and wait until the gateway reaches it."""
        if how == "SIGKILL":
            self.worker.kill()
        else:
            self.worker.stop()
        self.start_worker(env)
        self.reached()

    def reached(self) -> None:
        eventually(lambda: self.stub.Recommend(rec.RecommendRequest(user_id="u1", k=1), timeout=10))

    def channel(self, address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address)
        self.channels.append(channel)
        return channel

    @property
    def stub(self) -> gateway_pb2_grpc.GatewayStub:
        return gateway_pb2_grpc.GatewayStub(self.channel(self.gateway.address))

    @property
    def recommender(self) -> recommender_pb2_grpc.RecommenderStub:
        return recommender_pb2_grpc.RecommenderStub(self.channel(self.worker.address))

    def serving(self) -> dict[str, str]:
        """The worker's serving versions, in memory (its ListModels)."""
        with grpc.insecure_channel(self.worker.address) as channel:
            listed = encoder_pb2_grpc.EncoderStub(channel).ListModels(enc.ListModelsRequest(), timeout=10)
        return {model.id: model.version for model in listed.models}

    def current(self) -> dict[str, str]:
        """What CURRENT names on disk, per model."""
        return {
            folder.name: (folder / "CURRENT").read_text()
            for folder in self.data_dir.iterdir()
            if (folder / "CURRENT").is_file()
        }

    def disk(self) -> dict[str, str]:
        """Every file and folder under the data directory, with a hash of each file's content."""
        return {
            str(path.relative_to(self.data_dir)): (
                hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
            )
            for path in sorted(self.data_dir.rglob("*"))
        }

    def hidden(self) -> list[str]:
        return [str(path) for path in self.data_dir.rglob(".*")]

    def fits_answered(self) -> float:
        """Fit calls the worker has finished, whatever their status (its metrics)."""
        body = urllib.request.urlopen(
            f"http://127.0.0.1:{self.worker.metrics_port}/metrics", timeout=5
        ).read()
        return sum(
            float(value)
            for labels, value in re.findall(
                r"^rpc_requests_total\{(.*)\} (\S+)$", body.decode(), re.MULTILINE
            )
            if 'method="Fit"' in labels
        )


@dataclass(frozen=True)
class State:
    serving: dict[str, str]
    disk: dict[str, str]


def state(cluster: Cluster) -> State:
    return State(cluster.serving(), cluster.disk())


def consistent(cluster: Cluster) -> dict[str, str]:
    """Once the worker has settled (within WAIT_S): memory serves what CURRENT names, no Fit left a
    temporary or staged folder; the serving versions."""
    deadline = time.monotonic() + WAIT_S
    while True:
        serving, current, hidden = cluster.serving(), cluster.current(), cluster.hidden()
        if serving == current and not hidden:
            return serving
        assert time.monotonic() < deadline, f"memory {serving}, CURRENT {current}, left behind {hidden}"
        time.sleep(0.1)


def eventually(
    call: Callable[[], T], retry: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)
) -> T:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() not in retry or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def fit_error(call: Iterator[rec.FitProgress]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        for progress in call:
            assert not progress.done, "a Fit that had to fail completed"
    return info.value


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path, redis_server: RedisServer
) -> Iterator[Cluster]:
    data_dir = tmp_path_factory.mktemp("hostile-data")
    fit_dir = tmp_path_factory.mktemp("hostile-fit")
    placeholder = useritem_worker(data_dir, WORKER_ENV, log_dir, fit_dir=fit_dir)
    front = gateway([], redis_server.url, GATEWAY_ENV, log_dir, useritem=placeholder.address)
    front.name = "gateway-hostile"
    cluster = Cluster(placeholder, front, data_dir, fit_dir, log_dir)
    try:
        cluster.start_worker()
        front.start()
        front.wait_serving()
        done = list(cluster.stub.Fit(iter(requests(ratings(1))), timeout=60))[-1]
        assert done.done and consistent(cluster) == {"mf": done.model.version}
        yield cluster
    finally:
        for channel in cluster.channels:
            channel.close()
        front.stop()
        cluster.worker.stop()


# --- stalled callers ---------------------------------------------------------------------------------------


class Stalling:
    """A request stream that sends `messages`, then (with `keep_alive`) that message every IDLE_S / 4
    until `hold` is set, then neither sends nor ends until `release` is set. `silent_since`: a time no
    later than the worker's last receipt (taken before the call, and before each message is handed over)."""

    def __init__(self, messages: list[rec.FitRequest], keep_alive: rec.FitRequest | None = None) -> None:
        self.messages = messages
        self.keep_alive = keep_alive
        self.hold = threading.Event()
        self.release = threading.Event()
        self.silent_since = time.monotonic()

    def __iter__(self) -> Iterator[rec.FitRequest]:
        for message in self.messages:
            self.silent_since = time.monotonic()
            yield message
        while self.keep_alive is not None and not self.hold.wait(IDLE_S / 4):
            self.silent_since = time.monotonic()
            yield self.keep_alive
        self.release.wait(WAIT_S * 4)


def keep_alive() -> rec.FitRequest:
    return rec.FitRequest(interactions=[rec.Interaction(user_id="u1", item_id="i1", rating=3.0)])


def refused_while_busy(cluster: Cluster) -> grpc.RpcError:
    """Once the worker's Fit slot is taken (empty Fits, refused for their emptiness while it is free, tell),
    the error a Fit of model "bob" gets."""
    deadline = time.monotonic() + WAIT_S
    while (
        probe := fit_error(cluster.stub.Fit(iter([]), timeout=WAIT_S))
    ).code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert probe.code() == grpc.StatusCode.INVALID_ARGUMENT and time.monotonic() < deadline, (
            probe.details()
        )
        time.sleep(0.05)
    return fit_error(cluster.stub.Fit(iter(requests(ratings(3), model="bob")), timeout=WAIT_S))


@pytest.mark.parametrize("route", ["gateway", "worker"])
@pytest.mark.parametrize("sent", [0, 1], ids=["no message", "one message"])
def test_a_stalled_fit_is_aborted_after_the_idle_timeout_and_frees_the_slot(
    cluster: Cluster, route: str, sent: int
) -> None:
    before = state(cluster)
    fit = cluster.stub.Fit if route == "gateway" else cluster.recommender.Fit
    stalling = Stalling(requests(ratings(2), model=SECRET_MODEL)[:sent], keep_alive() if sent else None)
    try:
        call = fit(iter(stalling), timeout=WAIT_S * 2)
        if sent:  # while it runs, another caller is refused, told a Fit is running, not whose or of what
            refused = refused_while_busy(cluster)
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
            assert "a Fit is running" in refused.details() and SECRET_MODEL not in refused.details()
        stalling.hold.set()
        error = fit_error(call)
        elapsed = time.monotonic() - stalling.silent_since
    finally:
        stalling.release.set()
    assert error.code() == grpc.StatusCode.ABORTED, error.details()
    assert "USERITEM_FIT_IDLE_TIMEOUT_S" in error.details() and "changed nothing" in error.details()
    assert IDLE_S <= elapsed < IDLE_S + WAIT_S, elapsed
    assert state(cluster) == before
    # the slot is free at once: a Fit of the serving data runs to the end (the same version: training is
    # seeded, so the disk holds what it held)
    done = list(cluster.stub.Fit(iter(requests(ratings(1))), timeout=WAIT_S))[-1]
    assert done.done and done.model.version == before.serving["mf"]
    assert state(cluster) == before


# --- callers that leave, workers that are killed --------------------------------------------------------


# After sending everything, or after reading epoch k's progress. At most EPOCHS - 2 epochs read, the caller
# leaves seconds before promotion could start: nothing may change. After the last epoch the caller leaves
# while the version is written or promoted: whichever it is, memory and disk must agree, now and after a
# restart.
CANCEL_POINTS = [0, EPOCHS - 2, EPOCHS]


@pytest.mark.parametrize("point", CANCEL_POINTS, ids=[f"after {p} epochs" for p in CANCEL_POINTS])
def test_a_fit_whose_caller_leaves_changes_nothing_or_completes_its_promotion(
    cluster: Cluster, point: int
) -> None:
    before = state(cluster)
    answered = cluster.fits_answered()
    call = cluster.stub.Fit(iter(requests(large(10 + point))), timeout=WAIT_S)
    for _ in range(point):
        progress = next(call)
        assert not progress.done
    call.cancel()
    deadline = time.monotonic() + WAIT_S
    while cluster.fits_answered() <= answered:
        assert time.monotonic() < deadline, "the worker never finished the cancelled Fit"
        time.sleep(0.05)
    serving = consistent(cluster)
    if point < EPOCHS:
        assert state(cluster) == before
    elif serving != before.serving:
        print(f"\nMEASURED a caller leaving after the last epoch found the promotion started: {serving}")
    cluster.restart_worker("SIGKILL")
    assert consistent(cluster) == serving  # a restart serves what was serving


@pytest.mark.parametrize("point", CANCEL_POINTS[1:], ids=[f"after {p} epochs" for p in CANCEL_POINTS[1:]])
def test_a_worker_killed_during_a_fit_serves_a_whole_version_after_restart(
    cluster: Cluster, point: int
) -> None:
    before = state(cluster)
    call = cluster.recommender.Fit(iter(requests(large(20 + point))), timeout=WAIT_S)
    for _ in range(point):
        assert not next(call).done
    cluster.worker.kill()
    error = fit_error(call)
    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), error.details()
    cluster.start_worker()
    cluster.reached()
    serving = consistent(cluster)  # a kill after the commit point: the start finishes the promotion
    if point < EPOCHS:
        assert state(cluster) == before
    # whatever serves is whole: it loaded with its checksums, and answers
    assert set(serving) == set(before.serving)
    response = cluster.stub.Recommend(rec.RecommendRequest(user_id="u1", k=3), timeout=10)
    assert response.model.version == serving["mf"]


# --- training that diverges, scales it cannot use ----------------------------------------------------------


def test_a_fit_whose_training_diverges_fails_and_changes_nothing_also_after_a_restart(
    cluster: Cluster,
) -> None:
    before = state(cluster)
    cluster.restart_worker("SIGTERM", {"USERITEM_INIT_STD": "1e20"})  # every first step overflows
    try:
        error = fit_error(cluster.stub.Fit(iter(requests(ratings(30))), timeout=WAIT_S))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert "training diverged" in error.details() and "USERITEM_LEARNING_RATE" in error.details()
        assert state(cluster) == before
    finally:
        cluster.restart_worker("SIGKILL")
    assert state(cluster) == before


def unit_scale(rows: list[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
    return [(user, item, (rating - 1.0) / 4.0) for user, item, rating in rows]


BAD_SCALES: dict[str, tuple[dict[str, float], str]] = {
    "the largest float32 (3.4e38)": ({"rating_min": 0.0, "rating_max": 3.4e38}, "within ±1e+09"),
    "only rating_max, 1e-300": ({"rating_max": 1e-300}, "rating_max is set without rating_min"),
    "1e-300, which float32 makes 0": ({"rating_min": 0.0, "rating_max": 1e-300}, "[0, 0] is not valid"),
    "nan": ({"rating_min": float("nan"), "rating_max": 5.0}, "finite"),
    "-inf": ({"rating_min": float("-inf"), "rating_max": 5.0}, "finite"),
    "too narrow for its magnitude": ({"rating_min": 1e6, "rating_max": 1e6 + 1.0}, "at least 0.0001 times"),
}


@pytest.mark.parametrize("case", list(BAD_SCALES))
def test_a_rating_scale_training_cannot_use_is_refused(cluster: Cluster, case: str) -> None:
    before = state(cluster)
    scale, phrase = BAD_SCALES[case]
    error = fit_error(cluster.stub.Fit(iter(requests(ratings(40), **scale)), timeout=WAIT_S))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert phrase in error.details(), error.details()
    assert state(cluster) == before


def test_a_scale_of_0_to_1_trains_a_usable_model(cluster: Cluster) -> None:
    rows = unit_scale(ratings(41))
    fit = requests(rows, model="unit-scale", rating_min=0.0, rating_max=1.0)
    done = list(cluster.stub.Fit(iter(fit), timeout=WAIT_S))[-1]
    assert done.done and 0 < done.validation_rmse < 1
    hits = cluster.stub.Recommend(
        rec.RecommendRequest(model="unit-scale", user_id="u3", k=5), timeout=10
    ).items
    scores = [hit.score for hit in hits]
    assert len(scores) == 5 and all(np.isfinite(scores)) and all(-0.5 < score < 1.5 for score in scores), (
        scores
    )
    bad = fit_error(
        cluster.stub.Fit(
            iter(requests([*rows, ("u1", "i1", 1.5)], model="unit-scale", rating_min=0.0, rating_max=1.0)),
            timeout=WAIT_S,
        )
    )
    assert (
        bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside the rating scale [0, 1]" in bad.details()
    )


# --- what messages tell ----------------------------------------------------------------------------------


def test_no_message_names_a_path_of_the_worker_or_another_callers_model(cluster: Cluster) -> None:
    outside = cluster.fit_dir.parent / "outside.csv"
    outside.write_text("user_id,item_id,rating\n" + "".join(f"u{n},i{n % 3},3\n" for n in range(30)))
    os.symlink(outside, cluster.fit_dir / "link.csv")
    (cluster.fit_dir / "folder.csv").mkdir()
    (cluster.fit_dir / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    (cluster.fit_dir / "latin1.csv").write_bytes("user_id,item_id,rating\nJos\xe9,i1,3\n".encode("latin-1"))
    (cluster.fit_dir / "columns.csv").write_text("user,item,stars\nu1,i1,3\n")
    (cluster.data_dir / "blocked").write_text("a file where the model's folder would go")  # a disk failure
    files = [
        "../outside.csv",
        str(outside),
        "link.csv",
        "folder.csv",
        "missing.parquet",
        "broken.parquet",
        "latin1.csv",
        "columns.csv",
        "../../../../etc/passwd",
    ]
    cases = [(f"file {name}", [rec.FitRequest(path=name, model="files")]) for name in files]
    cases.append(("a disk that cannot hold the model", requests(ratings(50), model="blocked")))
    secrets = {
        str(cluster.data_dir),
        str(cluster.fit_dir),
        str(cluster.fit_dir.resolve()),
        str(cluster.data_dir.resolve()),
        str(outside.parent),
        "/tmp",
        SECRET_MODEL,
    }
    messages: dict[str, str] = {}
    codes: dict[str, grpc.StatusCode] = {}
    for case, fit in cases:
        for route, call in (("gateway", cluster.stub.Fit), ("worker", cluster.recommender.Fit)):
            error = fit_error(call(iter(fit), timeout=WAIT_S))
            messages[f"{case} via {route}"], codes[f"{case} via {route}"] = error.details(), error.code()
    stalling = Stalling(requests(ratings(2), model=SECRET_MODEL)[:1], keep_alive())
    try:
        stalled = cluster.recommender.Fit(iter(stalling), timeout=WAIT_S * 2)
        busy = refused_while_busy(cluster)
        messages["a Fit while another runs"], codes["a Fit while another runs"] = busy.details(), busy.code()
        stalling.hold.set()
        idle = fit_error(stalled)
        messages["a stalled Fit"], codes["a stalled Fit"] = idle.details(), idle.code()
    finally:
        stalling.release.set()
    assert codes["a stalled Fit"] == grpc.StatusCode.ABORTED
    leaks = {
        case: message for case, message in messages.items() if any(secret in message for secret in secrets)
    }
    assert not leaks, leaks
    # and each still says what to fix
    assert codes["file ../outside.csv via gateway"] == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside the worker's fit directory" in messages[f"file {outside} via gateway"]
    assert "outside the worker's fit directory" in messages["file link.csv via worker"]
    assert codes["file missing.parquet via worker"] == grpc.StatusCode.NOT_FOUND
    assert "'folder.csv'" in messages["file folder.csv via gateway"]
    assert "cannot read broken.parquet" in messages["file broken.parquet via worker"]
    assert "columns.csv has no column user_id, item_id, rating" in messages["file columns.csv via worker"]
    disk = messages["a disk that cannot hold the model via gateway"]
    assert codes["a disk that cannot hold the model via gateway"] == grpc.StatusCode.INTERNAL
    assert "could not write the new version" in disk and "USERITEM_DATA_DIR" in disk
    assert codes["a Fit while another runs"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    (cluster.data_dir / "blocked").unlink()
