"""Text model backends; `build_backends` picks them from the settings."""

from services.encoder.backend import EncoderBackend
from services.text.backends.clip_text import ClipTextBackend
from services.text.backends.sentence_onnx import OnnxSentenceBackend
from services.text.backends.sentence_transformer import SentenceTransformerBackend
from services.text.settings import TextSettings


def build_backends(settings: TextSettings) -> list[EncoderBackend]:
    backends: list[EncoderBackend] = []
    if settings.sentence_model_enabled:
        backends.append(_sentence_backend(settings, int8=False))
    if settings.sentence_int8_enabled:
        backends.append(_sentence_backend(settings, int8=True))
    if settings.clip.enabled:
        backends.append(ClipTextBackend(settings.clip, settings.max_text_chars))
    if not backends:
        raise ValueError(
            "no text model enabled: set TEXT_SENTENCE_MODEL_ENABLED=true, TEXT_SENTENCE_INT8_ENABLED=true "
            "or CLIP_MODEL"
        )
    return backends


def _sentence_backend(settings: TextSettings, int8: bool) -> EncoderBackend:
    """The sentence model on the runtime the settings name (int8: always ONNX Runtime)."""
    if settings.sentence_runtime == "torch" and not int8:
        return SentenceTransformerBackend(
            settings.sentence_model_path,
            settings.sentence_model_id,
            settings.sentence_model_space,
            settings.max_text_chars,
        )
    return OnnxSentenceBackend(
        settings.sentence_model_path,
        settings.sentence_int8_model_id if int8 else settings.sentence_model_id,
        settings.sentence_model_space,
        settings.max_text_chars,
        settings.cache_dir,
        settings.onnx_threads,
        int8=int8,
        lanes=settings.onnx_lanes,
    )
