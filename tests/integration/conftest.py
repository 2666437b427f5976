"""Systems shared by the client and CLI tests (tests/system.py), started once for the session when first
asked for."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.processes import RedisServer, Service
from tests.system import SecureGateway, System, full_system, secure_gateway


@pytest.fixture(scope="session")
def system(
    tmp_path_factory: pytest.TempPathFactory,
    log_dir: Path,
    redis_server: RedisServer,
    text_service: Service,
    image_service: Service,
) -> Iterator[System]:
    with full_system(
        tmp_path_factory.mktemp("client-system"), log_dir, redis_server, text_service, image_service
    ) as started:
        yield started


@pytest.fixture(scope="session")
def locked_gateway(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path, text_service: Service
) -> Iterator[SecureGateway]:
    with secure_gateway(tmp_path_factory.mktemp("client-certs"), log_dir, text_service) as started:
        yield started
