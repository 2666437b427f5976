"""The container health check (python -m services.healthcheck) and the plaintext health port
(*_HEALTH_PORT), against real index shards (the fastest service to start): a plaintext shard, a TLS-only
shard whose probes go to its health port, and what that port says while a shard drains after SIGTERM."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from embeddings.v1 import index_pb2, index_pb2_grpc
from embeddings.v1 import types_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.processes import ROOT, Service, free_port, health_status, index_shard, running
from services.common.vectors import to_wire
from tests.certificates import CertificateAuthority

pytestmark = pytest.mark.integration

INDEX_SERVICE = index_pb2.DESCRIPTOR.services_by_name["Index"].full_name


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m services.healthcheck index` with exactly these INDEX_* variables (as in a container
    whose environment is the shard's)."""
    clean = {name: value for name, value in os.environ.items() if not name.upper().startswith("INDEX_")}
    return subprocess.run(
        [sys.executable, "-m", "services.healthcheck", "index", "--timeout-s", "2"],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def stats(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.StatusCode:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            index_pb2_grpc.IndexStub(channel).Stats(index_pb2.IndexStatsRequest(), timeout=3)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def health_of(address: str, service: str) -> str:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=3
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


# --- a plaintext shard: the health check asks its main port ------------------------------------------


@pytest.fixture(scope="module")
def plain_shard(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[Service]:
    shard = index_shard(tmp_path_factory.mktemp("plain-shard"), log_dir=log_dir, name="index-plain")
    with running(shard) as started:
        yield started


def test_the_health_check_passes_for_a_serving_shard(plain_shard: Service) -> None:
    result = healthcheck({"INDEX_PORT": str(plain_shard.port)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"index on port {plain_shard.port}: SERVING"


def test_a_second_shard_on_a_port_in_use_exits_saying_so_and_the_first_keeps_all_calls(
    plain_shard: Service, tmp_path: Path, log_dir: Path
) -> None:
    """gRPC's default SO_REUSEPORT would let it bind the same port and take a share of the connections."""
    second = index_shard(tmp_path, log_dir=log_dir, port=plain_shard.port, name="index-same-port")
    second.start()
    try:
        assert second.wait(30) == 1, second.log_tail()
    finally:
        second.kill()
    assert f"cannot listen on 127.0.0.1:{plain_shard.port} (INDEX_PORT)" in second.log_tail()
    assert health_status(plain_shard.address) == "SERVING"


def test_the_health_check_fails_where_nothing_listens() -> None:
    port = free_port()
    result = healthcheck({"INDEX_PORT": str(port)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"index on port {port}: UNREACHABLE" in result.stdout


# --- a TLS-only shard with a plaintext health port -----------------------------------------------------


@dataclass
class TlsShard:
    service: Service
    health_port: int
    env: dict[str, str]

    @property
    def health_address(self) -> str:
        return f"127.0.0.1:{self.health_port}"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("health-ca"), "health-ca")


def tls_shard(ca: CertificateAuthority, data_dir: Path, log_dir: Path, name: str, **env: str) -> TlsShard:
    """A shard whose main port speaks TLS only, with a plaintext health port."""
    server = ca.issue(name, client=False)
    health_port = free_port()
    settings = {
        "INDEX_TLS_CERT": str(server.cert),
        "INDEX_TLS_KEY": str(server.key),
        "INDEX_HEALTH_PORT": str(health_port),
        **env,
    }
    service = index_shard(data_dir, settings, log_dir, name=name)
    service.credentials = grpc.ssl_channel_credentials(ca.cert_path.read_bytes())
    return TlsShard(service, health_port, {**service.env, **settings})


@pytest.fixture(scope="module")
def secure_shard(
    ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> Iterator[TlsShard]:
    shard = tls_shard(ca, tmp_path_factory.mktemp("tls-shard"), log_dir, "index-tls")
    with running(shard.service):
        yield shard


def test_the_health_port_answers_in_plaintext(secure_shard: TlsShard) -> None:
    assert health_status(secure_shard.health_address) == "SERVING"
    assert health_of(secure_shard.health_address, INDEX_SERVICE) == "SERVING"


def test_the_health_port_serves_nothing_but_health(secure_shard: TlsShard) -> None:
    assert stats(secure_shard.health_address) == grpc.StatusCode.UNIMPLEMENTED


def test_the_main_port_still_speaks_tls_only(secure_shard: TlsShard) -> None:
    shard = secure_shard.service
    assert stats(shard.address) == grpc.StatusCode.UNAVAILABLE
    assert stats(shard.address, shard.credentials) == grpc.StatusCode.OK


def test_the_health_check_asks_the_health_port(secure_shard: TlsShard) -> None:
    result = healthcheck(secure_shard.env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"index on port {secure_shard.health_port}: SERVING"


def test_without_a_health_port_the_health_check_cannot_ask_a_tls_shard(secure_shard: TlsShard) -> None:
    env = {name: value for name, value in secure_shard.env.items() if name != "INDEX_HEALTH_PORT"}
    result = healthcheck(env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "INDEX_HEALTH_PORT" in result.stderr


# --- SIGTERM: the health port says NOT_SERVING while the shard drains, then goes away ------------------


def wait_for(read: Callable[[], str], expected: str, timeout: float = 10.0) -> str:
    """What `read` returns once it is `expected`, or at the deadline."""
    deadline = time.monotonic() + timeout
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


def test_after_sigterm_the_health_port_says_not_serving_then_goes_away(
    ca: CertificateAuthority, tmp_path: Path, log_dir: Path
) -> None:
    # serve() drains in-flight calls (up to INDEX_SHUTDOWN_GRACE_S) with health NOT_SERVING, and stops the
    # health port only after the main server: an open UpsertStream keeps the shard draining meanwhile
    shard = tls_shard(ca, tmp_path / "data", log_dir, "index-drain", INDEX_SHUTDOWN_GRACE_S="20")
    release = threading.Event()
    vector = to_wire(np.full(8, 8**-0.5, dtype=np.float32))

    def requests() -> Iterator[index_pb2.IndexUpsertRequest]:
        item = index_pb2.IndexItem(id="draining", vector=vector, kind=pb.INPUT_KIND_TEXT)
        yield index_pb2.IndexUpsertRequest(space="drain", items=[item], request_id="1")
        release.wait(30)

    with running(shard.service) as service:
        assert service.credentials is not None
        with grpc.secure_channel(service.address, service.credentials) as channel:
            responses = index_pb2_grpc.IndexStub(channel).UpsertStream(requests(), timeout=60)
            try:
                assert next(responses).upserted == 1  # the call is in flight on the shard
                service.signal(signal.SIGTERM)
                status = wait_for(lambda: health_status(shard.health_address), "NOT_SERVING")
                assert status == "NOT_SERVING", f"health port during the drain: {status}"
                assert health_of(shard.health_address, INDEX_SERVICE) == "NOT_SERVING"
                result = healthcheck(shard.env)
                assert result.returncode == 1, result.stdout + result.stderr
                assert "NOT_SERVING" in result.stdout
                assert service.running(), "the shard should still be draining its open stream"
            finally:
                release.set()
            assert list(responses) == []  # the stream the shard drained ended normally
        assert service.wait(30) == 0, service.log_tail()
        assert health_status(shard.health_address) == "UNREACHABLE"
