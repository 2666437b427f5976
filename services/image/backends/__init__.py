"""Image model backends; `build_backends` picks them from the settings."""

from services.encoder.backend import EncoderBackend
from services.image.backends.clip_image import ClipImageBackend
from services.image.backends.efficientnet_lite import EfficientNetLiteBackend
from services.image.backends.label_space import LabelSpaceBackend
from services.image.backends.resnet import ResNetBackend
from services.image.decoding import ImageLimits
from services.image.settings import ImageSettings


def build_backends(settings: ImageSettings) -> list[EncoderBackend]:
    limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.max_aspect_ratio)
    backends: list[EncoderBackend] = []
    if settings.efficientnet_enabled:
        backends.append(EfficientNetLiteBackend(settings.efficientnet_checkpoint, limits))
    if settings.label_space_enabled:
        backends.append(
            LabelSpaceBackend(
                checkpoint=settings.efficientnet_checkpoint,
                text_model_path=settings.label_space_text_model_path,
                space=settings.label_space_space,
                top_k=settings.label_space_top_k,
                prompt=settings.label_space_prompt,
                cache_dir=settings.cache_dir,
                limits=limits,
            )
        )
    if settings.resnet_model:
        backends.append(ResNetBackend(settings.resnet_model, settings.resnet_checkpoint, limits))
    if settings.clip.enabled:
        backends.append(ClipImageBackend(settings.clip, limits))
    if not backends:
        raise ValueError(
            "no image model enabled: set IMAGE_EFFICIENTNET_ENABLED, IMAGE_LABEL_SPACE_ENABLED, "
            "IMAGE_RESNET_MODEL or CLIP_MODEL"
        )
    return backends
