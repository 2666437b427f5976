"""Index shard server: the Index service over one shard's durable store (no models)."""
