"""Settings every encoder worker shares (request limits, micro-batching, torch threads) and the CLIP_*
settings the text and image workers both read."""

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.settings import ServiceSettings


class ClipSettings(BaseSettings):
    """One open_clip CLIP model: the text worker serves its text tower, the image worker its image tower.

    Both read the same CLIP_* variables, so both towers load the same checkpoint and share one space.
    """

    model_config = SettingsConfigDict(env_prefix="CLIP_", extra="ignore")

    model: str = Field("", description="open_clip architecture name, e.g. ViT-B-32; empty: CLIP is off.")
    checkpoint: str = Field("", description="Local path of the checkpoint file (required with CLIP_MODEL).")
    config: str = Field(
        "",
        description="Optional path of an open_clip model config JSON, for architectures open_clip "
        "does not know by name (its file name, less .json, is the architecture name).",
    )
    space: str = Field("", description="Space id of this CLIP model; default clip-<CLIP_MODEL>.")

    @property
    def enabled(self) -> bool:
        return bool(self.model)

    @property
    def space_id(self) -> str:
        return self.space or f"clip-{self.model}"


class EncoderSettings(ServiceSettings):
    """What every process serving the Encoder contract adds: request limits, stream window, torch threads."""

    max_inputs_per_request: int = Field(256, description="Most inputs in one Encode request.")
    stream_window: int = Field(8, description="Requests of one EncodeStream handled at once.")
    torch_threads: int = Field(0, description="torch intra-op threads; 0: one per core.")


class WorkerSettings(EncoderSettings):
    """What a worker that runs models on micro-batches adds: the batcher's limits."""

    max_batch_size: int = Field(32, description="Most inputs in one model batch.")
    max_wait_ms: float = Field(
        1.0,
        description="Longest an input waits for its batch to fill (under load batches fill while the "
        "model runs, so a longer wait only adds latency).",
    )
    max_queue: int = Field(2048, description="Most inputs waiting; past it: RESOURCE_EXHAUSTED.")
    client_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Most of the work waiting to be prepared (see *_MAX_QUEUED_*) one client may hold; past it "
        "its next request is refused with RESOURCE_EXHAUSTED.",
    )
