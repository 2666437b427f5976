"""Gateway: the public API. Routes to workers, caches vectors in Redis, computes similarities."""
