"""The gateway's own metrics: the vector cache, and calls to workers and shards that failed."""

from prometheus_client import Counter

CACHE_HITS = Counter("cache_hits_total", "Vector cache hits", ["model"])
CACHE_MISSES = Counter("cache_misses_total", "Vector cache misses", ["model"])
CACHE_INVALID = Counter(
    "cache_invalid_total",
    "Cached entries that were not valid vectors of their model (treated as misses)",
    ["model"],
)
CACHE_ERRORS = Counter("cache_errors_total", "Redis calls that failed (the cache was bypassed)", ["op"])
WORKER_FAILURES = Counter("worker_failures_total", "Calls to a worker that failed", ["worker", "code"])
SHARD_FAILURES = Counter(
    "shard_failures_total",
    "Index shard calls that failed or missed their deadline",
    ["shard", "method", "code"],
)
