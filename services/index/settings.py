"""Index shard settings, from INDEX_* environment variables: the store's (`IndexSettings`, which the
store and its tests use alone) and the shard process's (`ShardSettings`: the store's plus the server's)."""

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.settings import ServiceSettings
from services.index.engines import EngineConfig


class IndexSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    data_dir: str = Field("data/index", description="Directory of this shard's log and snapshots.")
    fsync: Literal["always", "interval"] = Field(
        "always",
        description="always: an upsert or delete is acknowledged once fsync'd (concurrent writes share "
        "one fsync). interval: once written to the OS, which survives a killed process but not a power "
        "cut; fsync'd every INDEX_FSYNC_INTERVAL_MS.",
    )
    fsync_interval_ms: int = Field(200, description="fsync period with INDEX_FSYNC=interval.")
    snapshot_every_ops: int = Field(
        100_000, description="Snapshot after this many logged upserts and deletes (start-up replays fewer)."
    )
    snapshot_interval_s: float = Field(
        300.0, description="Snapshot a shard with unsnapshotted writes at least this often."
    )
    snapshot_log_bytes: int = Field(
        64 * 1024 * 1024,
        description="Snapshot also once the log written since the last snapshot reaches this many bytes "
        "(with the two snapshots kept, the log on disk stays under about twice this).",
    )
    close_snapshot_s: float = Field(
        5.0,
        description="Longest the snapshots at shutdown (one in progress, then the final one) may take in "
        "all; past it they are given up (the log holds every write, the next start replays it). 0: no "
        "snapshot at shutdown.",
    )
    compact_min_retired: int = Field(
        10_000,
        description="A space's replaced and deleted rows are dropped from memory (its rows and engine "
        "rebuilt, off the event loop) once they are at least this many and at least as many as its live "
        "items.",
    )
    ann_threshold: int = Field(
        20_000,
        description="A space with at least this many items switches from exact search to the ANN "
        "engine; 0: always exact.",
    )
    ann_engine: Literal["sq8", "hnsw"] = Field(
        "sq8",
        description="sq8: 8-bit scalar-quantised scan with exact re-rank (recall independent of the "
        "data). hnsw: HNSW graph (much faster on real embeddings, poor on random vectors).",
    )
    sq8_rerank: int = Field(10, description="sq8: candidates re-ranked exactly, as a multiple of k.")
    hnsw_m: int = Field(32, description="hnsw: graph degree.")
    hnsw_ef_construction: int = Field(80, description="hnsw: candidate list size while building.")
    hnsw_ef_search: int = Field(128, description="hnsw: candidate list size while searching (at least k).")
    max_k: int = Field(1000, description="Largest k of a search.")
    max_items_per_request: int = Field(1024, description="Most items in one upsert or delete request.")
    max_payload_bytes: int = Field(16_384, description="Largest JSON payload of one item, in bytes.")
    max_id_bytes: int = Field(512, description="Longest item id, in UTF-8 bytes.")
    stream_window: int = Field(4, description="Requests of one UpsertStream handled at once.")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            ann_threshold=self.ann_threshold,
            ann_engine=self.ann_engine,
            sq8_rerank=self.sq8_rerank,
            hnsw_m=self.hnsw_m,
            hnsw_ef_construction=self.hnsw_ef_construction,
            hnsw_ef_search=self.hnsw_ef_search,
        )


class ShardSettings(ServiceSettings, IndexSettings):
    model_config = SettingsConfigDict(env_prefix="INDEX_", extra="ignore")

    port: int = Field(50071, description="gRPC port.")
    metrics_port: int = Field(9171, description="Prometheus /metrics port; 0 disables it.")
    shard_name: str = Field("", description="Name of this shard in hits and stats; empty: host:port.")
