"""The whole system for the client and CLI tests: two index shards, a user-item worker and a gateway wired
to them and to the session's text and image workers and Redis; and a locked-down gateway (TLS that
requires client certificates, bearer tokens) in front of the text worker. Plus the files they use:
sample photos, ratings."""

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from embeddings.v1 import index_pb2, index_pb2_grpc
from PIL import Image

from harness.processes import RedisServer, Service, gateway, index_shard, running, useritem_worker
from tests import image_files
from tests.certificates import CertificateAuthority, IssuedFiles

USERITEM_ENV = {
    "USERITEM_DEFAULT_KIND": "mf",  # small vectors for the client tests (EASE: test_useritem_ranking.py)
    "USERITEM_FACTORS": "4",
    "USERITEM_EPOCHS": "5",
    "USERITEM_BATCH_SIZE": "64",
    "USERITEM_TORCH_THREADS": "1",
    "USERITEM_SHUTDOWN_GRACE_S": "2",
}
SHARD_ENV = {"INDEX_SHUTDOWN_GRACE_S": "2"}
GATEWAY_ENV = {"GATEWAY_MODEL_REFRESH_S": "1", "GATEWAY_SHUTDOWN_GRACE_S": "2"}
TOKEN = "client-test-token"
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "horse", "camera", "coins", "moon")


@dataclass
class System:
    gateway: Service
    shards: list[Service]
    useritem: Service

    def indexed(self, space: str) -> int:
        """Live items in `space`, over every shard (from the shards' own Stats)."""
        total = 0
        for shard in self.shards:
            with grpc.insecure_channel(shard.address) as channel:
                stats = index_pb2_grpc.IndexStub(channel).Stats(
                    index_pb2.IndexStatsRequest(space=space), timeout=10
                )
            total += sum(int(entry.count) for entry in stats.spaces if entry.space == space)
        return total


@contextmanager
def full_system(
    data_dir: Path, log_dir: Path, redis: RedisServer, text: Service, image: Service
) -> Iterator[System]:
    shards = [
        index_shard(data_dir / f"shard-{n}", SHARD_ENV, log_dir, name=f"client-shard-{n}") for n in range(2)
    ]
    worker = useritem_worker(data_dir / "useritem", USERITEM_ENV, log_dir)
    worker.name = "client-useritem"
    front = gateway(
        [text.address, image.address],
        redis.url,
        GATEWAY_ENV,
        log_dir,
        shards=[shard.address for shard in shards],
        useritem=worker.address,
    )
    front.name = "client-gateway"
    started: list[Service] = []
    try:
        for backend in [*shards, worker]:  # in parallel: each loads on its own
            backend.start()
            started.append(backend)
        for backend in started:
            backend.wait_serving()
        front.start()
        started.append(front)
        front.wait_serving()
        yield System(front, shards, worker)
    finally:
        for process in reversed(started):
            process.signal(signal.SIGTERM)
        for process in reversed(started):
            process.stop()


@dataclass(frozen=True)
class SecureGateway:
    """A gateway that speaks TLS only, requires a client certificate from `ca` and the bearer TOKEN."""

    service: Service
    ca: CertificateAuthority
    client: IssuedFiles


@contextmanager
def secure_gateway(cert_dir: Path, log_dir: Path, text: Service) -> Iterator[SecureGateway]:
    ca = CertificateAuthority(cert_dir, "client-test-ca")
    server, client = ca.issue("gateway", client=False), ca.issue("caller", server=False)
    settings = {
        **GATEWAY_ENV,
        "GATEWAY_TLS_CERT": str(server.cert),
        "GATEWAY_TLS_KEY": str(server.key),
        "GATEWAY_TLS_CLIENT_CA": str(ca.cert_path),
        "GATEWAY_AUTH_TOKENS": TOKEN,
    }
    service = gateway([text.address], "", settings, log_dir)
    service.name = "client-secure-gateway"
    chain, key = client.read()
    service.credentials = grpc.ssl_channel_credentials(ca.cert_path.read_bytes(), key, chain)
    with running(service) as started:
        yield SecureGateway(started, ca, client)


def write_photos(folder: Path, names: tuple[str, ...] = PHOTOS) -> list[str]:
    """scikit-image sample photos as JPEG files `<name>.jpg`; their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / f"{name}.jpg").write_bytes(image_files.photo(name, "JPEG"))
    return sorted(f"{name}.jpg" for name in names)


def write_crops(folder: Path, count: int, side: int = 160, seed: int = 0) -> list[str]:
    """`count` distinct JPEGs (random crops of the astronaut photo: never in the vector cache) in nested
    folders; their paths relative to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = image_files.photo_pixels("astronaut")
    rng = np.random.default_rng(seed)
    names = []
    for n in range(count):
        top, left = rng.integers(0, pixels.shape[0] - side, size=2)
        name = f"part-{n % 4}/crop-{n:03d}.jpg"
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(pixels[top : top + side, left : left + side]).save(folder / name, quality=90)
        names.append(name)
    return sorted(names)


def ratings(users: int = 12, items: int = 10, per_user: int = 6) -> list[tuple[str, str, float]]:
    """users x per_user explicit ratings (1..5, seeded); user u rates items u, u+1, ... (mod items), so
    every item is rated and every user has unseen items."""
    rng = np.random.default_rng(3)
    return [
        (f"u{user}", f"i{(user + step) % items}", float(rng.integers(1, 6)))
        for user in range(users)
        for step in range(per_user)
    ]
