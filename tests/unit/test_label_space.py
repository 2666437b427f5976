"""The label space's parts: the shipped class names, the class-prompt cache, the convex combination."""

from pathlib import Path

import numpy as np
import pytest
import torch

from services.image.backends.class_prompts import class_prompt_embeddings, imagenet_class_names
from services.image.backends.label_space import LabelSpaceBackend
from services.image.decoding import ImageLimits


def test_shipped_class_names_are_open_clips_imagenet_list() -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    assert imagenet_class_names() == list(IMAGENET_CLASSNAMES)


class _Embedder:
    """Stands in for the sentence model: counts calls, one fixed vector per prompt."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, prompts: list[str], **_: object) -> np.ndarray:
        self.calls += 1
        return np.array([[len(p), p.count("a")] for p in prompts], dtype=np.float32)


def test_class_prompts_are_computed_once_then_read_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sentence_transformers

    embedder = _Embedder()
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", lambda *a, **k: embedder)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(b"v1")
    names = ["cat", "banana"]

    first, version = class_prompt_embeddings(names, "a photo of a {}", model_dir, tmp_path / "cache")
    again, _ = class_prompt_embeddings(names, "a photo of a {}", model_dir, tmp_path / "cache")
    assert embedder.calls == 1
    assert np.array_equal(first, again) and first.tolist() == [[16, 3], [19, 5]]

    class_prompt_embeddings(names, "an image of a {}", model_dir, tmp_path / "cache")
    (model_dir / "weights.bin").write_bytes(b"v2")
    _, new_version = class_prompt_embeddings(names, "a photo of a {}", model_dir, tmp_path / "cache")
    assert embedder.calls == 3, "a new prompt or new weights must be embedded anew"
    assert new_version != version


class _Classifier:
    """Stands in for EfficientNet: the 'features' are the logits themselves."""

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def class_logits(self, features: torch.Tensor) -> torch.Tensor:
        return features


def test_an_image_is_the_renormalised_mix_of_its_top_k_class_embeddings() -> None:
    backend = LabelSpaceBackend(
        checkpoint="",
        text_model_path="/unused",
        space="minilm",
        top_k=2,
        prompt="a photo of a {}",
        cache_dir="/unused",
        limits=ImageLimits(1, 1, 1.0),
    )
    backend._classifier = _Classifier()  # type: ignore[assignment]
    backend._prompts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    probabilities = torch.tensor([[0.6, 0.3, 0.1]])
    got = backend.forward(probabilities.log()).numpy()[0]
    expected = np.array([2 / 3, 1 / 3, 0.0])  # top 2 renormalised: 0.6 / 0.9, 0.3 / 0.9
    assert np.allclose(got, expected / np.linalg.norm(expected), atol=1e-6)


@pytest.mark.parametrize(("top_k", "prompt"), [(0, "a {}"), (1001, "a {}"), (10, "no placeholder")])
def test_bad_label_space_settings_are_refused(top_k: int, prompt: str) -> None:
    with pytest.raises(ValueError, match="IMAGE_LABEL_SPACE"):
        LabelSpaceBackend(
            checkpoint="",
            text_model_path="/unused",
            space="minilm",
            top_k=top_k,
            prompt=prompt,
            cache_dir="/unused",
            limits=ImageLimits(1, 1, 1.0),
        )
