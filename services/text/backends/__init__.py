"""Text model backends; `build_backends` picks them from the settings."""

from services.encoder.backend import EncoderBackend
from services.text.backends.clip_text import ClipTextBackend
from services.text.backends.sentence_transformer import SentenceTransformerBackend
from services.text.settings import TextSettings


def build_backends(settings: TextSettings) -> list[EncoderBackend]:
    backends: list[EncoderBackend] = []
    if settings.sentence_model_enabled:
        backends.append(
            SentenceTransformerBackend(
                settings.sentence_model_path,
                settings.sentence_model_id,
                settings.sentence_model_space,
                settings.max_text_chars,
            )
        )
    if settings.clip.enabled:
        backends.append(ClipTextBackend(settings.clip, settings.max_text_chars))
    if not backends:
        raise ValueError("no text model enabled: set TEXT_SENTENCE_MODEL_ENABLED=true or CLIP_MODEL")
    return backends
