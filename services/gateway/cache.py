"""The Redis vector cache: content hash -> the model's full float32 output (plus truncation facts).

A cache, not a store: every Redis failure is logged and counted, and the call goes on without it.
After a failure Redis is left alone for `retry_s` (so a dead Redis costs no latency), then tried
again; redis-py opens fresh connections, so the cache comes back by itself when Redis does.

Redis is one server, or a Redis Cluster (`cluster`): then the URL names any one node, redis-py finds the
others and follows MOVED/ASK, and a batch of keys, which hash to many slots, goes out as one pipeline per
node, the nodes in parallel. A node that fails fails the whole batch, as one Redis would.
"""

import asyncio
import hashlib
import logging
import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np
import redis.asyncio as redis
from embeddings.v1 import types_pb2 as pb
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from services.gateway import metrics

log = logging.getLogger("cache")

# flags (bit 0: truncated), tokens, dimension, crc32 of the vector's bytes
_HEADER = struct.Struct("<BIII")
_TRUNCATED = 1
# RedisClusterException (no node reachable, a node not in cluster mode, slots not covered) is no RedisError.
_FAILURES = (RedisError, RedisClusterException, OSError)


@dataclass
class RawVector:
    """A model's full float32 output for one input, with what the model did to the input."""

    values: np.ndarray
    tokens: int = 0
    truncated: bool = False

    def to_bytes(self) -> bytes:
        data = np.ascontiguousarray(self.values, dtype="<f4").tobytes()
        flags = _TRUNCATED if self.truncated else 0
        return _HEADER.pack(flags, self.tokens, len(self.values), zlib.crc32(data)) + data

    @classmethod
    def from_bytes(cls, blob: bytes, dimension: int) -> "RawVector | None":
        """The entry `blob` holds, or None when it is not one this cache wrote for a `dimension`-d model:
        too short or long, another dimension, a checksum that fails, unknown flags, non-finite values."""
        if len(blob) != _HEADER.size + 4 * dimension:
            return None
        flags, tokens, stored_dimension, crc = _HEADER.unpack_from(blob)
        data = memoryview(blob)[_HEADER.size :]
        if stored_dimension != dimension or flags & ~_TRUNCATED or zlib.crc32(data) != crc:
            return None
        values = np.frombuffer(data, dtype="<f4")
        if not np.all(np.isfinite(values)):
            return None
        return cls(values, tokens, bool(flags & _TRUNCATED))


def cache_key(model_id: str, model_version: str, item: pb.Input) -> str:
    """sha256 of (model, model version, input kind, input content), behind a readable model prefix
    (so `redis-cli --scan --pattern 'emb:v2:<model>:*'` finds one model's entries). v2: entries carry
    their dimension and a checksum."""
    field = item.WhichOneof("content") or ""
    content = getattr(item, field) if field else b""
    digest = hashlib.sha256(b"\0".join([model_id.encode(), model_version.encode(), field.encode(), b""]))
    digest.update(content if isinstance(content, bytes) else content.encode())
    return f"emb:v2:{model_id}:{digest.hexdigest()}"


@dataclass(frozen=True)
class RedisAccess:
    """Credentials for Redis beyond its URL: a password (AUTH) and, for rediss:// URLs, TLS files."""

    password: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def client_options(self) -> dict[str, str]:
        """redis-py keyword arguments; a password in the URL takes precedence over `password`."""
        options = {"password": self.password} if self.password else {}
        if self.tls_ca:
            options["ssl_ca_certs"] = self.tls_ca
        if self.tls_cert:
            options |= {"ssl_certfile": self.tls_cert, "ssl_keyfile": self.tls_key}
        return options


def _connect(
    url: str, timeout_s: float, access: RedisAccess, cluster: bool
) -> redis.Redis | RedisCluster | None:
    """The client for `url` (it connects at its first call); None, logged, when no cluster client can be
    made from it."""
    options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, **access.client_options()}
    if not cluster:
        return redis.from_url(url, **options)
    try:
        # None of the cluster client's own retries (10 by default, each re-reading the slot map, some after
        # a 0.25 s sleep: seconds for a dead node): as with one Redis, the first failure is the cache's.
        return RedisCluster.from_url(url, retry=Retry(NoBackoff(), 0), **options)
    except RedisClusterException as error:  # a database other than 0, a unix socket
        log.error("the Redis URL cannot name a Redis Cluster node (%s): running without the cache", error)
        return None


class VectorCache:
    def __init__(
        self,
        url: str,
        ttl_s: int,
        timeout_s: float,
        retry_s: float,
        access: RedisAccess = RedisAccess(),
        cluster: bool = False,
    ) -> None:
        self._client = _connect(url, timeout_s, access, cluster) if url else None
        self._ttl_s = ttl_s
        self._retry_s = retry_s
        self._down_until = 0.0

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def _available(self) -> bool:
        return self._client is not None and time.monotonic() >= self._down_until

    async def _failed(self, op: str, error: Exception) -> None:
        """Count the failure, bypass Redis for `retry_s`, and drop the pooled connections: after a Redis
        restart each of them would otherwise fail once more, each failure starting another bypass."""
        assert self._client is not None
        metrics.CACHE_ERRORS.labels(op).inc()
        if time.monotonic() >= self._down_until:
            # the message by hand: redis-py's exceptions' repr is their class alone
            log.warning(
                "redis %s failed (%s: %s); bypassing the cache for %.1fs",
                op,
                type(error).__name__,
                error,
                self._retry_s,
            )
        self._down_until = time.monotonic() + self._retry_s
        try:
            if isinstance(self._client, RedisCluster):
                await self._reset_cluster(self._client)
            else:
                await self._client.connection_pool.disconnect()
        except _FAILURES as disconnect_error:
            log.debug("dropping redis connections failed: %r", disconnect_error)

    @staticmethod
    async def _reset_cluster(client: RedisCluster) -> None:
        """Drop every node's connections and read the slot map again from a node that answers (a replica
        may have taken a dead node's slots). Not `aclose()`: the client's next call would then set itself
        up again through the first node it knows, and fail for as long as that one node is down."""
        await asyncio.gather(*(node.disconnect() for node in client.get_nodes()))
        await client.nodes_manager.initialize()

    async def get_many(self, keys: list[str], model: str, dimension: int) -> list[RawVector | None]:
        """One round trip for all keys (to each node of a cluster at once); all None when Redis is down. An
        entry that is not a valid `dimension`-d vector (damaged, or written by something else) is a miss,
        counted in cache_invalid_total, never an answer."""
        if not keys or not self._available():
            return [None] * len(keys)
        assert self._client is not None
        try:
            if isinstance(self._client, RedisCluster):
                blobs = await self._client.mget_nonatomic(keys)  # one MGET cannot span slots
            else:
                blobs = await self._client.mget(keys)
        except _FAILURES as error:
            await self._failed("get", error)
            return [None] * len(keys)
        found = [RawVector.from_bytes(blob, dimension) if isinstance(blob, bytes) else None for blob in blobs]
        invalid = sum(1 for blob, raw in zip(blobs, found, strict=True) if blob is not None and raw is None)
        if invalid:
            metrics.CACHE_INVALID.labels(model).inc(invalid)
            log.warning(
                "%d cached entries of model %s were not valid %d-d vectors: treated as misses",
                invalid,
                model,
                dimension,
            )
        return found

    async def put_many(self, entries: dict[str, RawVector]) -> None:
        if not entries or not self._available():
            return
        assert self._client is not None
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, raw in entries.items():
                    pipe.set(key, raw.to_bytes(), ex=self._ttl_s)
                await pipe.execute()
        except _FAILURES as error:
            await self._failed("put", error)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
