"""The Redis vector cache: blob format, keys, and behaviour against a real (and failing) redis-server."""

import asyncio
import itertools
import signal
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
import redis.asyncio as redis
from embeddings.v1 import types_pb2 as pb
from prometheus_client import REGISTRY
from pydantic import ValidationError

from harness.processes import RedisServer
from services.gateway.cache import RawVector, VectorCache, cache_key
from services.gateway.settings import GatewaySettings

_counter = itertools.count()


def new_key() -> str:
    return f"test:cache:{next(_counter)}:{time.monotonic_ns()}"


def vector(seed: int, dim: int = 8, tokens: int = 0, truncated: bool = False) -> RawVector:
    values = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return RawVector(values, tokens, truncated)


def assert_same(actual: RawVector | None, expected: RawVector) -> None:
    assert actual is not None
    assert actual.values.dtype == np.float32
    np.testing.assert_array_equal(actual.values, expected.values)
    assert actual.tokens == expected.tokens
    assert actual.truncated == expected.truncated


def cache_errors(op: str) -> float:
    return REGISTRY.get_sample_value("cache_errors_total", {"op": op}) or 0.0


# --- RawVector ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "tokens", "truncated"),
    [
        ([0.1, -2.5, 3e-8, 1e30], 12345, True),
        ([1.0], 0, False),
        ([0.0] * 768, 2**32 - 1, False),
        ([], 7, True),
    ],
)
def test_raw_vector_bytes_round_trip(values: list[float], tokens: int, truncated: bool) -> None:
    raw = RawVector(np.array(values, dtype=np.float32), tokens, truncated)
    blob = raw.to_bytes()
    assert len(blob) == 13 + 4 * len(values)
    assert_same(RawVector.from_bytes(blob, len(values)), raw)


def test_raw_vector_stores_float64_input_as_float32() -> None:
    raw = RawVector(np.array([1 / 3, -2.0], dtype=np.float64), 3, False)
    back = RawVector.from_bytes(raw.to_bytes(), 2)
    assert back is not None
    np.testing.assert_array_equal(back.values, np.array([1 / 3, -2.0], dtype=np.float32))


def _damaged(blob: bytes, how: str) -> bytes:
    if how == "truncated":
        return blob[:-1]
    if how == "extended":
        return blob + b"\0\0\0\0"
    if how == "empty":
        return b""
    if how == "flipped value bit":
        return blob[:-1] + bytes([blob[-1] ^ 0x01])
    if how == "flipped checksum bit":
        return blob[:9] + bytes([blob[9] ^ 0x80]) + blob[10:]
    if how == "unknown flag":
        return bytes([blob[0] | 0x80]) + blob[1:]
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["truncated", "extended", "empty", "flipped value bit", "flipped checksum bit", "unknown flag"]
)
def test_a_damaged_entry_is_no_vector(how: str) -> None:
    blob = vector(1).to_bytes()
    assert RawVector.from_bytes(blob, 8) is not None
    assert RawVector.from_bytes(_damaged(blob, how), 8) is None


def test_an_entry_of_another_dimension_or_with_non_finite_values_is_no_vector() -> None:
    assert RawVector.from_bytes(vector(1, dim=8).to_bytes(), 4) is None
    assert RawVector.from_bytes(vector(1, dim=4).to_bytes(), 8) is None
    for bad in (np.nan, np.inf, -np.inf):
        values = vector(2).values.copy()
        values[3] = bad
        assert RawVector.from_bytes(RawVector(values).to_bytes(), 8) is None


# --- cache_key ------------------------------------------------------------------------------------


def test_cache_key_is_deterministic_and_names_model_and_version() -> None:
    key = cache_key("text-small", "v3", pb.Input(text="hello"))
    assert key == cache_key("text-small", "v3", pb.Input(text="hello"))
    assert key.startswith("emb:v2:text-small:")


def test_cache_key_fields_cannot_run_into_each_other() -> None:
    item = pb.Input(text="hello")
    assert cache_key("a:b", "c", item) != cache_key("a", "b:c", item)


def test_cache_key_differs_by_model_version_and_content() -> None:
    item = pb.Input(text="hello")
    base = cache_key("text-small", "v3", item)
    assert cache_key("text-large", "v3", item) != base
    assert cache_key("text-small", "v4", item) != base
    assert cache_key("text-small", "v3", pb.Input(text="hello!")) != base
    assert cache_key("text-small", "v3", pb.Input(text="Hello")) != base


def test_cache_key_differs_between_kinds_with_the_same_content() -> None:
    keys = {
        cache_key("m", "1", pb.Input(text="abc")),
        cache_key("m", "1", pb.Input(image=b"abc")),
        cache_key("m", "1", pb.Input(user_id="abc")),
        cache_key("m", "1", pb.Input(item_id="abc")),
    }
    assert len(keys) == 4


# --- VectorCache against a real redis-server ----------------------------------------------------------


@pytest.fixture
async def cache(redis_server: RedisServer) -> AsyncIterator[VectorCache]:
    # A timeout a healthy Redis meets on a busy machine too: these tests are not about timeouts.
    vectors = VectorCache(redis_server.url, ttl_s=60, timeout_s=5.0, retry_s=0.3)
    yield vectors
    await vectors.close()


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    direct = redis.from_url(redis_server.url)
    yield direct
    await direct.aclose()


async def test_get_many_on_an_empty_cache_gives_nones(cache: VectorCache) -> None:
    assert cache.enabled
    assert await cache.get_many([new_key(), new_key(), new_key()], "m", 8) == [None, None, None]
    assert await cache.get_many([], "m", 8) == []


async def test_put_many_then_get_many_in_key_order_with_one_mget(
    cache: VectorCache, client: redis.Redis
) -> None:
    keys = [new_key() for _ in range(3)]
    entries = {
        keys[0]: vector(1, tokens=5),
        keys[1]: vector(2, truncated=True, tokens=512),
        keys[2]: vector(3),
    }
    await cache.put_many(entries)

    await client.config_resetstat()
    got = await cache.get_many([keys[2], new_key(), keys[0], keys[1]], "m", 8)
    stats = await client.info("commandstats")

    assert got[1] is None
    assert_same(got[0], entries[keys[2]])
    assert_same(got[2], entries[keys[0]])
    assert_same(got[3], entries[keys[1]])
    assert stats["cmdstat_mget"]["calls"] == 1
    assert "cmdstat_get" not in stats


def cache_invalid(model: str) -> float:
    return REGISTRY.get_sample_value("cache_invalid_total", {"model": model}) or 0.0


async def test_an_entry_that_is_not_a_valid_vector_is_a_counted_miss(
    cache: VectorCache, client: redis.Redis
) -> None:
    """What Redis holds is checked, not trusted: damaged or foreign values are misses, never answers."""
    good, other_dimension, garbage, damaged = (new_key() for _ in range(4))
    await cache.put_many({good: vector(10), other_dimension: vector(11, dim=4)})
    await client.set(garbage, b"not a vector at all")
    blob = vector(12).to_bytes()
    await client.set(damaged, blob[:-1] + bytes([blob[-1] ^ 0x10]))
    before = cache_invalid("checked-model")

    got = await cache.get_many([good, other_dimension, garbage, damaged, new_key()], "checked-model", 8)

    assert_same(got[0], vector(10))
    assert got[1:] == [None, None, None, None]
    assert cache_invalid("checked-model") == before + 3  # an absent key is a plain miss


async def test_put_many_sets_the_ttl(cache: VectorCache, client: redis.Redis) -> None:
    key = new_key()
    await cache.put_many({key: vector(4)})
    assert 58 <= await client.ttl(key) <= 60


async def test_keys_expire_after_the_ttl(redis_server: RedisServer, client: redis.Redis) -> None:
    short = VectorCache(redis_server.url, ttl_s=1, timeout_s=5.0, retry_s=0.3)
    try:
        key = new_key()
        await short.put_many({key: vector(5)})
        assert 0 < await client.pttl(key) <= 1000  # Redis expires it within the second
        await asyncio.sleep(1.1)
        assert await short.get_many([key], "m", 8) == [None]
        assert await client.exists(key) == 0
    finally:
        await short.close()


async def test_disabled_cache_is_a_no_op() -> None:
    disabled = VectorCache("", ttl_s=60, timeout_s=0.2, retry_s=0.3)
    assert not disabled.enabled
    await disabled.put_many({"k": vector(6)})
    assert await disabled.get_many(["k", "j"], "m", 8) == [None, None]
    await disabled.close()


# The cache's timeouts in the two tests below, and the margin a call on this shared machine may take past
# a timeout it waits for. The retry pause is long enough that the calls meant to fall inside it do, on a
# busy machine too (they take milliseconds).
TIMEOUT_S, RETRY_S, LATE_S = 0.2, 2.0, 1.0


async def past_retry(failed_at: float) -> None:
    """Until the cache's pause after the failure at `failed_at` is over."""
    await asyncio.sleep(max(0.0, failed_at + RETRY_S - time.monotonic()) + 0.05)


async def test_dead_redis_is_bypassed_and_the_cache_comes_back_after_restart(
    start_redis: Callable[..., RedisServer],
) -> None:
    server = start_redis()
    port = server.port
    vectors = VectorCache(server.url, ttl_s=60, timeout_s=TIMEOUT_S, retry_s=RETRY_S)
    try:
        key, raw = new_key(), vector(7)
        await vectors.put_many({key: raw})
        assert_same((await vectors.get_many([key], "m", 8))[0], raw)
        get_errors, put_errors = cache_errors("get"), cache_errors("put")

        server.kill()
        start = time.monotonic()
        assert await vectors.get_many([key, new_key()], "m", 8) == [None, None]
        failed_at = time.monotonic()
        assert failed_at - start < TIMEOUT_S + LATE_S
        assert cache_errors("get") == get_errors + 1

        # within retry_s Redis is not tried at all: no error, no latency
        await vectors.put_many({key: raw})
        assert await vectors.get_many([key], "m", 8) == [None]
        assert time.monotonic() - failed_at < RETRY_S, "too slow to check the pause: the calls came after it"
        assert cache_errors("get") == get_errors + 1
        assert cache_errors("put") == put_errors

        await past_retry(failed_at)
        await vectors.put_many({key: raw})  # tried again, fails, does not raise
        assert cache_errors("put") == put_errors + 1
        failed_at = time.monotonic()

        restarted = start_redis(port=port)
        assert restarted.url == server.url
        await past_retry(failed_at)
        assert await vectors.get_many([key], "m", 8) == [None]  # a fresh, empty redis
        await vectors.put_many({key: raw})
        assert_same((await vectors.get_many([key], "m", 8))[0], raw)
        assert cache_errors("get") == get_errors + 1
        assert cache_errors("put") == put_errors + 1
    finally:
        await vectors.close()


async def test_hung_redis_times_out_quickly_and_answers_are_not_mixed_up_afterwards(
    start_redis: Callable[..., RedisServer],
) -> None:
    server = start_redis()
    vectors = VectorCache(server.url, ttl_s=60, timeout_s=TIMEOUT_S, retry_s=RETRY_S)
    try:
        first, second = new_key(), new_key()
        entries = {first: vector(8), second: vector(9)}
        await vectors.put_many(entries)
        get_errors = cache_errors("get")

        server.signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            assert await vectors.get_many([first], "m", 8) == [None]
            failed_at = time.monotonic()
            assert failed_at - start < TIMEOUT_S + LATE_S
            assert cache_errors("get") == get_errors + 1
        finally:
            server.signal(signal.SIGCONT)

        await past_retry(failed_at)
        # the late reply to the timed-out MGET must not be taken for this one's
        got = await vectors.get_many([second, first], "m", 8)
        assert_same(got[0], entries[second])
        assert_same(got[1], entries[first])
    finally:
        await vectors.close()


@pytest.mark.parametrize("url", ["http://redis:6379", "localhost:6379", "redis-cluster://a:1"])
def test_a_redis_url_of_another_scheme_is_a_settings_error(url: str) -> None:
    with pytest.raises(ValidationError, match=r"GATEWAY_REDIS_URL.*redis://, rediss:// or unix://"):
        GatewaySettings(redis_url=url)


@pytest.mark.parametrize(
    "url", ["", "redis://localhost:6379/0", "rediss://:pw@r:6380/1", "unix:///tmp/r.sock"]
)
def test_redis_urls_redis_py_opens_are_accepted(url: str) -> None:
    assert GatewaySettings(redis_url=url).redis_url == url
