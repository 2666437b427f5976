"""Fixtures for the unit tests: a real, throwaway redis-server for the vector cache tests; index stores
opened in a test's data directories."""

from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from harness.processes import RedisServer, running
from services.index.settings import IndexSettings
from services.index.store import IndexStore
from tests.unit.index_data import OpenStore


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


@pytest.fixture
async def open_store() -> AsyncIterator[OpenStore]:
    """Open stores; those still open at the end (not closed or killed by the test) are closed."""
    opened: list[IndexStore] = []

    async def start(settings: IndexSettings) -> IndexStore:
        store = IndexStore(settings)
        await store.open()
        opened.append(store)
        return store

    yield start
    for store in opened:
        if store._log._fd is not None:
            await store.close()
