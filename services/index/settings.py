"""Index shard settings, from INDEX_* environment variables."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.index.settings import IndexSettings
from services.common.settings import ServiceSettings


class ShardSettings(ServiceSettings, IndexSettings):
    model_config = SettingsConfigDict(env_prefix="INDEX_", extra="ignore")

    port: int = Field(50071, description="gRPC port.")
    metrics_port: int = Field(9171, description="Prometheus /metrics port; 0 disables it.")
    shard_name: str = Field("", description="Name of this shard in hits and stats; empty: host:port.")
