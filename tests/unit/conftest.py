"""Fixtures for the unit tests: a real, throwaway redis-server for the vector cache tests."""

from collections.abc import Callable, Iterator

import pytest

from harness.processes import RedisServer, running


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server shared by a module's tests (they use distinct keys)."""
    with running(RedisServer()) as server:
        yield server


@pytest.fixture
def start_redis() -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers a test may kill, pause or restart; all are killed afterwards."""
    started: list[RedisServer] = []

    def start(port: int | None = None) -> RedisServer:
        server = RedisServer(port=port)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()
