"""Loading an open_clip CLIP model from a local checkpoint (no hub access), shared by both towers."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.model_card import ModelCard
from services.encoder.settings import ClipSettings
from services.encoder.weights import content_version


@dataclass
class LoadedClip:
    model: Any
    preprocess: Any
    tokenizer: Any
    dimension: int
    version: str


def tower_card(
    settings: ClipSettings, clip: LoadedClip, tower: str, kind: int, max_input_tokens: int = 0
) -> ModelCard:
    """The card of one tower (`tower`: "text" or "image"): id clip-<model>-<tower>, in the model's space,
    so the two workers' towers of one checkpoint share a space and a version."""
    return ModelCard(
        id=f"{settings.space_id}-{tower}",
        version=clip.version,
        dimension=clip.dimension,
        space=settings.space_id,
        input_kinds=(kind,),
        max_input_tokens=max_input_tokens,
        description=f"open_clip {settings.model} {tower} tower from {settings.checkpoint}",
    )


def load_clip(settings: ClipSettings) -> LoadedClip:
    """Build the architecture `settings.model`, load `settings.checkpoint` into it, in eval mode on CPU."""
    import open_clip  # heavy import, only for workers that serve CLIP

    checkpoint = Path(settings.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"CLIP_CHECKPOINT={settings.checkpoint!r} is not a file; give the local path of the "
            f"{settings.model} checkpoint (CLIP weights are not downloaded)"
        )
    if settings.config:
        open_clip.add_model_config(Path(settings.config))
    config = open_clip.get_model_config(settings.model)
    if config is None:
        raise ValueError(
            f"CLIP_MODEL={settings.model!r} is not an architecture open_clip knows; "
            "name one of open_clip.list_models() or give its config JSON in CLIP_CONFIG"
        )
    model, _, preprocess = open_clip.create_model_and_transforms(
        settings.model, pretrained=str(checkpoint), device="cpu"
    )
    model.eval()
    return LoadedClip(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(settings.model),
        dimension=int(config["embed_dim"]),
        version=content_version(checkpoint),
    )
