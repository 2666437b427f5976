"""Prometheus metrics every process has (calls by method and status, their latency), and the HTTP server
that serves a process's metrics; each service defines its own metrics beside its code."""

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUESTS = Counter("rpc_requests_total", "gRPC calls handled", ["service", "method", "code"])
LATENCY = Histogram(
    "rpc_latency_seconds",
    "gRPC call latency",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

IN_FLIGHT = Gauge("rpc_in_flight", "Calls being handled now (health checks not counted)", ["service"])


def start_metrics_server(port: int) -> None:
    """Serve /metrics on `port` (0: no metrics endpoint)."""
    if port:
        start_http_server(port)
