"""Prometheus metrics shared by every service; served over HTTP on the service's metrics port."""

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUESTS = Counter("rpc_requests_total", "gRPC calls handled", ["service", "method", "code"])
LATENCY = Histogram(
    "rpc_latency_seconds",
    "gRPC call latency",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SIZE = Histogram(
    "batch_size", "Inputs per model batch", ["batcher"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
QUEUE_DEPTH = Gauge("batch_queue_depth", "Inputs waiting for a model batch", ["batcher"])
QUEUE_REJECTED = Counter(
    "batch_queue_rejected_total", "Inputs refused because the queue was full", ["batcher"]
)
DROPPED = Counter(
    "batch_dropped_total",
    "Queued inputs dropped because the caller cancelled or its deadline passed",
    ["batcher"],
)
CACHE_HITS = Counter("cache_hits_total", "Vector cache hits", ["model"])
CACHE_MISSES = Counter("cache_misses_total", "Vector cache misses", ["model"])
CACHE_ERRORS = Counter("cache_errors_total", "Redis calls that failed (the cache was bypassed)", ["op"])
WORKER_FAILURES = Counter("worker_failures_total", "Calls to a worker that failed", ["worker", "code"])

SHARD_FAILURES = Counter(
    "shard_failures_total",
    "Index shard calls that failed or missed their deadline",
    ["shard", "method", "code"],
)


def start_metrics_server(port: int) -> None:
    """Serve /metrics on `port` (0: no metrics endpoint)."""
    if port:
        start_http_server(port)
