"""Transport security and access control with real processes: TLS on the gateway's port, mutual TLS
from the gateway to an index shard and to its text, image and user-item workers, bearer tokens, a password- and a TLS-protected Redis, the concurrent
call limit, and settings that name files which do not exist."""

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import gateway_pb2_grpc, index_pb2, index_pb2_grpc
from embeddings.v1 import types_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from embeddings_client import Client, RetryPolicy, Unavailable
from harness.processes import (
    RedisServer,
    RedisTls,
    Service,
    free_port,
    gateway,
    health_status,
    image_worker,
    index_shard,
    running,
    text_worker,
    useritem_worker,
)
from services.common.vectors import to_wire
from tests import image_files
from tests.certificates import CertificateAuthority, IssuedFiles
from tests.clip_checkpoint import NAME as CLIP_NAME
from tests.clip_checkpoint import TinyClip
from tests.helpers import metric, texts
from tests.system import USERITEM_ENV, ratings

pytestmark = pytest.mark.integration

DIM = 8


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("ca"), "test-ca")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("other-ca"), "other-ca")


def client_credentials(
    ca: CertificateAuthority, client: IssuedFiles | None = None
) -> grpc.ChannelCredentials:
    chain, key = client.read() if client else (None, None)
    return grpc.ssl_channel_credentials(ca.cert_path.read_bytes(), private_key=key, certificate_chain=chain)


def vector(seed: int) -> pb.Vector:
    values = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return to_wire(values / np.linalg.norm(values))


# --- TLS on the gateway's public port, mutual TLS to a shard ------------------------------------------


@pytest.fixture(scope="module")
def mtls_shard(
    ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> Iterator[Service]:
    """An index shard that accepts only callers with a certificate from `ca`."""
    server = ca.issue("shard", client=False)
    settings = {
        "INDEX_TLS_CERT": str(server.cert),
        "INDEX_TLS_KEY": str(server.key),
        "INDEX_TLS_CLIENT_CA": str(ca.cert_path),
    }
    shard = index_shard(tmp_path_factory.mktemp("mtls-shard"), settings, log_dir, name="index-mtls")
    shard.credentials = client_credentials(ca, ca.issue("harness", server=False))
    with running(shard) as service:
        yield service


@pytest.fixture(scope="module")
def tls_gateway(ca: CertificateAuthority, mtls_shard: Service, log_dir: Path) -> Iterator[Service]:
    """TLS on its own port; mutual TLS to its shard (its client certificate from `ca`); no encoders."""
    server, client = ca.issue("gateway", client=False), ca.issue("gateway-client", server=False)
    settings = {
        "GATEWAY_TLS_CERT": str(server.cert),
        "GATEWAY_TLS_KEY": str(server.key),
        "GATEWAY_WORKER_TLS_CA": str(ca.cert_path),
        "GATEWAY_WORKER_TLS_CERT": str(client.cert),
        "GATEWAY_WORKER_TLS_KEY": str(client.key),
    }
    service = gateway([], "", settings, log_dir, shards=[mtls_shard.address])
    service.credentials = client_credentials(ca)
    with running(service) as started:
        yield started


def test_a_tls_client_that_trusts_the_ca_reaches_the_shard_over_mutual_tls(
    tls_gateway: Service, ca: CertificateAuthority
) -> None:
    with grpc.secure_channel(tls_gateway.address, client_credentials(ca)) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        items = [gw.UpsertItem(id=f"tls-{i}", vector=vector(i)) for i in range(3)]
        assert stub.Upsert(gw.UpsertRequest(space="tls", items=items), timeout=10).upserted == 3
        hits = stub.Search(gw.SearchRequest(space="tls", vector=vector(1), k=1), timeout=10).hits
    assert [hit.id for hit in hits] == ["tls-1"]


def test_a_plaintext_client_cannot_talk_to_the_tls_port(tls_gateway: Service) -> None:
    with grpc.insecure_channel(tls_gateway.address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            gateway_pb2_grpc.GatewayStub(channel).ListModels(enc.ListModelsRequest(), timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_trusts_another_ca_cannot_connect(
    tls_gateway: Service, other_ca: CertificateAuthority
) -> None:
    with grpc.secure_channel(tls_gateway.address, client_credentials(other_ca)) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            gateway_pb2_grpc.GatewayStub(channel).ListModels(enc.ListModelsRequest(), timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("certificate", ["none", "from another CA"])
def test_the_mutual_tls_shard_refuses_callers_without_a_certificate_it_trusts(
    mtls_shard: Service, ca: CertificateAuthority, other_ca: CertificateAuthority, certificate: str
) -> None:
    client = other_ca.issue("stranger", server=False) if certificate != "none" else None
    chain, key = client.read() if client else (None, None)
    credentials = grpc.ssl_channel_credentials(
        ca.cert_path.read_bytes(), private_key=key, certificate_chain=chain
    )
    with grpc.secure_channel(mtls_shard.address, credentials) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            index_pb2_grpc.IndexStub(channel).Stats(index_pb2.IndexStatsRequest(), timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_gateway_without_a_client_certificate_gets_unavailable_from_the_mutual_tls_shard(
    ca: CertificateAuthority, mtls_shard: Service, log_dir: Path
) -> None:
    settings = {"GATEWAY_WORKER_TLS_CA": str(ca.cert_path), "GATEWAY_SHARD_TIMEOUT_S": "3"}
    with running(gateway([], "", settings, log_dir, shards=[mtls_shard.address])) as service:
        with grpc.insecure_channel(service.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Upsert(gw.UpsertRequest(space="tls", items=[gw.UpsertItem(id="x", vector=vector(9))]))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mtls_shard.address in (refused.value.details() or "")


# --- TLS to the workers, by the name in their certificates ------------------------------------------------

WORKER_NAME = "workers.internal"  # the only name in the workers' certificates: not the address dialled
CLIP_TEXT, CLIP_IMAGE = f"clip-{CLIP_NAME}-text", f"clip-{CLIP_NAME}-image"


@dataclass
class TlsWorkers:
    text: Service
    image: Service
    useritem: Service


def serving_on(worker: Service, health_port: int, deadline: float) -> None:
    """Wait for `worker` to serve, asked on its plaintext health port (its main port's certificate does not
    name the address the harness dials)."""
    while health_status(f"127.0.0.1:{health_port}") != "SERVING":
        assert worker.running(), worker.log_tail()
        assert time.monotonic() < deadline, f"{worker.name} not SERVING in time:\n{worker.log_tail()}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def mtls_workers(
    ca: CertificateAuthority, tiny_clip: TinyClip, tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> Iterator[TlsWorkers]:
    """A text, an image and a user-item worker, each accepting only callers with a certificate from `ca`,
    their certificates naming WORKER_NAME only. The text and image workers serve only the tiny CLIP's
    towers, so that they start in seconds; they are started together."""

    def tls(prefix: str, name: str) -> dict[str, str]:
        server = ca.issue(name, client=False, hosts=(WORKER_NAME,))
        return {
            f"{prefix}TLS_CERT": str(server.cert),
            f"{prefix}TLS_KEY": str(server.key),
            f"{prefix}TLS_CLIENT_CA": str(ca.cert_path),
            f"{prefix}HEALTH_PORT": str(free_port()),
        }

    text_settings = {**tiny_clip.env(), "TEXT_SENTENCE_MODEL_ENABLED": "false", **tls("TEXT_", "text")}
    image_settings = {
        **tiny_clip.env(),
        "IMAGE_EFFICIENTNET_ENABLED": "false",
        "IMAGE_LABEL_SPACE_ENABLED": "false",
        **tls("IMAGE_", "image"),
    }
    useritem_settings = {**USERITEM_ENV, **tls("USERITEM_", "useritem")}
    workers = TlsWorkers(
        text_worker(text_settings, log_dir),
        image_worker(image_settings, log_dir),
        useritem_worker(tmp_path_factory.mktemp("mtls-useritem"), useritem_settings, log_dir),
    )
    health_ports = [
        (workers.text, int(text_settings["TEXT_HEALTH_PORT"])),
        (workers.image, int(image_settings["IMAGE_HEALTH_PORT"])),
        (workers.useritem, int(useritem_settings["USERITEM_HEALTH_PORT"])),
    ]
    started: list[Service] = []
    try:
        for worker, _ in health_ports:
            worker.name = f"{worker.name}-mtls"
            worker.start()
            started.append(worker)
        deadline = time.monotonic() + 180
        for worker, port in health_ports:
            serving_on(worker, port, deadline)
        yield workers
    finally:
        for worker in started:
            worker.stop()


def tls_to_workers(ca: CertificateAuthority, server_name: str) -> dict[str, str]:
    client = ca.issue("gateway-to-workers", server=False)
    settings = {
        "GATEWAY_WORKER_TLS_CA": str(ca.cert_path),
        "GATEWAY_WORKER_TLS_CERT": str(client.cert),
        "GATEWAY_WORKER_TLS_KEY": str(client.key),
        "GATEWAY_DEFAULT_TEXT_MODEL": CLIP_TEXT,
        "GATEWAY_DEFAULT_IMAGE_MODEL": CLIP_IMAGE,
    }
    return {**settings, "GATEWAY_WORKER_TLS_SERVER_NAME": server_name} if server_name else settings


def test_the_gateway_reaches_its_workers_over_mutual_tls_by_gateway_worker_tls_server_name(
    ca: CertificateAuthority, mtls_workers: TlsWorkers, log_dir: Path
) -> None:
    """Encode on the text and image workers, Fit (a stream) and Recommend on the user-item worker, through
    the gateway over mutual TLS to each, whose certificates name WORKER_NAME and not 127.0.0.1; without
    GATEWAY_WORKER_TLS_SERVER_NAME a gateway cannot check those certificates, and the worker is unreachable."""
    encoders = [mtls_workers.text.address, mtls_workers.image.address]
    useritem = mtls_workers.useritem.address
    named = gateway(encoders, "", tls_to_workers(ca, WORKER_NAME), log_dir, useritem=useritem)
    with running(named), Client(named.address) as client:
        assert client.encode_text(["a cat"], model=CLIP_TEXT).vectors.shape[0] == 1
        assert client.encode_image([image_files.photo("chelsea")], model=CLIP_IMAGE).vectors.shape[0] == 1
        done = list(client.fit(ratings(), model="tls-mf"))[-1]
        assert done.done and done.model is not None
        recommended = client.recommend("u0", k=3, model="tls-mf")
        assert len(recommended.items) == 3 and recommended.model.version == done.model.version

    # Only the user-item worker: a gateway serves once an encoder worker listed its models, which these
    # cannot, here.
    unnamed = gateway([], "", tls_to_workers(ca, ""), log_dir, useritem=useritem)
    with running(unnamed), Client(unnamed.address, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(Unavailable, match=useritem):
            client.recommend("u0", k=3, model="tls-mf")


# --- bearer tokens -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text("# rotated by the test\ngamma\n")
    return path


@pytest.fixture(scope="module")
def auth_gateway(text_service: Service, tokens_file: Path, log_dir: Path) -> Iterator[Service]:
    settings = {"GATEWAY_AUTH_TOKENS": "alpha, beta", "GATEWAY_AUTH_TOKENS_FILE": str(tokens_file)}
    with running(gateway([text_service.address], "", settings, log_dir)) as service:
        yield service


def list_models(address: str, token: str | None) -> grpc.StatusCode:
    metadata = [("authorization", f"Bearer {token}")] if token is not None else None
    with grpc.insecure_channel(address) as channel:
        try:
            gateway_pb2_grpc.GatewayStub(channel).ListModels(
                enc.ListModelsRequest(), metadata=metadata, timeout=5
            )
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("", grpc.StatusCode.UNAUTHENTICATED),
        ("Alpha", grpc.StatusCode.UNAUTHENTICATED),
        ("alpha2", grpc.StatusCode.UNAUTHENTICATED),
        ("alpha", grpc.StatusCode.OK),
        ("beta", grpc.StatusCode.OK),
        ("gamma", grpc.StatusCode.OK),
    ],
)
def test_only_configured_tokens_are_accepted(
    auth_gateway: Service, token: str | None, code: grpc.StatusCode
) -> None:
    assert list_models(auth_gateway.address, token) == code


def test_unauthenticated_messages_say_what_to_send(auth_gateway: Service) -> None:
    def refused() -> float:
        return metric(
            auth_gateway.metrics_port, "rpc_requests_total", method="Encode", code="UNAUTHENTICATED"
        )

    before = refused()
    with grpc.insecure_channel(auth_gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.Encode(enc.EncodeRequest(inputs=texts("hello")), timeout=5)
        with pytest.raises(grpc.RpcError) as wrong:
            stub.Encode(
                enc.EncodeRequest(inputs=texts("hello")), metadata=[("authorization", "Bearer no")], timeout=5
            )
    assert "authorization: Bearer" in (missing.value.details() or "")
    assert "not accepted" in (wrong.value.details() or "")
    deadline = time.monotonic() + 10  # the count may follow the answer by a moment
    while refused() < before + 2:
        assert time.monotonic() < deadline, f"counted {refused() - before} of the 2 refused calls"
        time.sleep(0.05)


def test_streaming_calls_need_a_token_too(auth_gateway: Service) -> None:
    requests = [enc.EncodeRequest(inputs=texts(f"line {i}")) for i in range(3)]
    with grpc.insecure_channel(auth_gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.EncodeStream(iter(requests), timeout=5))
        answered = list(
            stub.EncodeStream(iter(requests), metadata=[("authorization", "Bearer beta")], timeout=30)
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(answered) == 3


def test_health_and_reflection_stay_open_without_a_token(auth_gateway: Service) -> None:
    with grpc.insecure_channel(auth_gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        services = [s.name for response in reflection for s in response.list_services_response.service]
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "embeddings.v1.Gateway" in services


def test_tokens_rotate_when_the_file_changes(text_service: Service, tmp_path: Path, log_dir: Path) -> None:
    """On a gateway of its own: rotating the module's token file would change what the other tests see."""
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("gamma\n")
    settings = {"GATEWAY_AUTH_TOKENS": "alpha", "GATEWAY_AUTH_TOKENS_FILE": str(tokens_file)}
    with running(gateway([text_service.address], "", settings, log_dir)) as rotating:
        assert list_models(rotating.address, "gamma") == grpc.StatusCode.OK
        tokens_file.write_text("delta\n")
        deadline = time.monotonic() + 10
        while list_models(rotating.address, "delta") != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the new token was not accepted within 10 s"
            time.sleep(0.2)
        assert list_models(rotating.address, "gamma") == grpc.StatusCode.UNAUTHENTICATED
        assert list_models(rotating.address, "alpha") == grpc.StatusCode.OK  # from GATEWAY_AUTH_TOKENS


# --- Redis with a password, Redis over TLS -------------------------------------------------------------


def encoded_twice_is_cached(address: str, text: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        stub.Encode(enc.EncodeRequest(inputs=texts(text)), timeout=30)
        return bool(stub.Encode(enc.EncodeRequest(inputs=texts(text)), timeout=30).embeddings[0].cached)


def test_the_cache_authenticates_to_a_redis_with_a_password(text_service: Service, log_dir: Path) -> None:
    with running(RedisServer(log_dir=log_dir, password="s3cret")) as redis:
        settings = {"GATEWAY_REDIS_PASSWORD": "s3cret"}
        with running(gateway([text_service.address], redis.url, settings, log_dir)) as service:
            assert encoded_twice_is_cached(service.address, "a password-protected cache")
        wrong = {"GATEWAY_REDIS_PASSWORD": "guess", "GATEWAY_REDIS_RETRY_S": "0.1"}
        with running(gateway([text_service.address], redis.url, wrong, log_dir)) as service:
            assert not encoded_twice_is_cached(service.address, "a cache that refuses us")
            assert metric(service.metrics_port, "cache_errors_total", op="get") >= 1


def test_the_cache_speaks_tls_with_a_client_certificate(
    text_service: Service, ca: CertificateAuthority, log_dir: Path
) -> None:
    server, client = ca.issue("redis", client=False), ca.issue("redis-client", server=False)
    tls = RedisTls(server.cert, server.key, ca.cert_path, auth_clients=True)
    with running(RedisServer(log_dir=log_dir, tls=tls)) as redis:
        settings = {
            "GATEWAY_REDIS_TLS_CA": str(ca.cert_path),
            "GATEWAY_REDIS_TLS_CERT": str(client.cert),
            "GATEWAY_REDIS_TLS_KEY": str(client.key),
        }
        with running(gateway([text_service.address], redis.url, settings, log_dir)) as service:
            assert encoded_twice_is_cached(service.address, "a cache over TLS")
            assert metric(service.metrics_port, "cache_errors_total", op="get") == 0


# --- limits and configuration errors -------------------------------------------------------------------


def test_calls_past_max_concurrent_calls_get_resource_exhausted(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> None:
    """Two open UpsertStreams hold both of the shard's call slots; a third call is refused at once."""
    release = threading.Event()

    def held_open() -> Iterator[index_pb2.IndexUpsertRequest]:
        release.wait(30)
        yield from ()

    shard = index_shard(tmp_path_factory.mktemp("busy-shard"), {"INDEX_MAX_CONCURRENT_CALLS": "2"}, log_dir)
    with running(shard) as service, grpc.insecure_channel(service.address) as channel:
        stub = index_pb2_grpc.IndexStub(channel)
        streams = [stub.UpsertStream(held_open(), timeout=30) for _ in range(2)]
        try:
            deadline = time.monotonic() + 10  # until the shard is handling both streams
            while metric(service.metrics_port, "rpc_in_flight", service="index") < 2:
                assert time.monotonic() < deadline, "the two streams never reached the shard"
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Stats(index_pb2.IndexStatsRequest(), timeout=5)
        finally:
            release.set()
            for stream in streams:
                stream.cancel()
        deadline = time.monotonic() + 10
        while True:
            try:
                stub.Stats(index_pb2.IndexStatsRequest(), timeout=5)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the shard did not answer after the streams ended"
                time.sleep(0.1)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        (
            {"GATEWAY_TLS_CERT": "/nonexistent/gw.crt", "GATEWAY_TLS_KEY": "/nonexistent/gw.key"},
            "GATEWAY_TLS_CERT",
        ),
        ({"GATEWAY_WORKER_TLS_CA": "/nonexistent/ca.crt"}, "GATEWAY_WORKER_TLS_CA"),
        ({"GATEWAY_AUTH_TOKENS_FILE": "/nonexistent/tokens"}, "GATEWAY_AUTH_TOKENS_FILE"),
        ({"GATEWAY_TLS_CERT": "/tmp/only-the-cert.crt"}, "GATEWAY_TLS_KEY"),
    ],
)
def test_a_gateway_with_unreadable_security_files_refuses_to_start(
    settings: dict[str, str], names: str, tmp_path: Path
) -> None:
    service = gateway([], "", settings, tmp_path)
    service.start()
    try:
        assert service.wait(timeout=30) != 0
    except subprocess.TimeoutExpired:
        service.kill()
        pytest.fail("the gateway started with unreadable security files")
    assert names in service.log_tail()
