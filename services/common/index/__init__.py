"""Index shards: items (id, normalised vector, kind, payload, model) per space, durable and searchable.

Used by every process that holds items: the index shard server (`services/index`) and the user-item
worker. `store.IndexStore` owns one shard's data; `service.IndexService` is its gRPC face.
"""
