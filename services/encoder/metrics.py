"""The encoder workers' batching metrics: batch sizes, queue depth, refusals and drops, per batcher."""

from prometheus_client import Counter, Gauge, Histogram

BATCH_SIZE = Histogram(
    "batch_size", "Inputs per model batch", ["batcher"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
QUEUE_DEPTH = Gauge("batch_queue_depth", "Inputs waiting for a model batch", ["batcher"])
QUEUE_REJECTED = Counter(
    "batch_queue_rejected_total", "Inputs refused because the queue was full", ["batcher"]
)
QUEUED_COST = Gauge(
    "prepare_queued_cost",
    "Cost (characters or pixels) of the requests admitted and not yet prepared",
    ["worker"],
)
DROPPED = Counter(
    "batch_dropped_total",
    "Queued inputs dropped because the caller cancelled or its deadline passed",
    ["batcher"],
)
