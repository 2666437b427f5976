"""imagenet-label-space: images in the sentence model's text space, with no CLIP weights.

An image's vector is the probability-weighted mix of the text embeddings of "a photo of a {class}" for
its top-k ImageNet classes (probabilities renormalised over those k), so a text encoded by the text
worker's sentence model is directly comparable with it: zero-shot by convex combination of semantic
embeddings (Norouzi et al., 2014). It knows only ImageNet's 1000 concepts; CLIP is the general bridge.
"""

import hashlib
from pathlib import Path

import torch
from embeddings.v1 import types_pb2 as pb

from services.common.model_card import ModelCard
from services.image.backends.base import ImageBackend
from services.image.backends.class_prompts import (
    class_prompt_embeddings,
    imagenet_class_names,
    sentence_model_path,
)
from services.image.backends.efficientnet_lite import INPUT_SIDE, efficientnet_transform, load_efficientnet
from services.image.decoding import ImageLimits

MODEL_ID = "imagenet-label-space"


class LabelSpaceBackend(ImageBackend):
    def __init__(
        self,
        *,
        checkpoint: str,
        text_model_path: str,
        space: str,
        top_k: int,
        prompt: str,
        cache_dir: str,
        limits: ImageLimits,
    ) -> None:
        super().__init__(limits)
        if not 1 <= top_k <= 1000:
            raise ValueError(f"IMAGE_LABEL_SPACE_TOP_K={top_k}; use 1..1000")
        if prompt.count("{}") != 1:
            raise ValueError(f"IMAGE_LABEL_SPACE_PROMPT={prompt!r} must hold one {{}} for the class name")
        self._checkpoint = checkpoint
        self._text_model_path = sentence_model_path(text_model_path)
        self._space = space
        self._top_k = top_k
        self._prompt = prompt
        self._cache_dir = Path(cache_dir).expanduser()

    def load(self) -> ModelCard:
        self._classifier = load_efficientnet(self._checkpoint)
        prompts, text_version = class_prompt_embeddings(
            imagenet_class_names(), self._prompt, self._text_model_path, self._cache_dir
        )
        self._prompts = torch.from_numpy(prompts)
        self.transform = efficientnet_transform()
        self.input_side = INPUT_SIDE
        recipe = f"{self._classifier.version}\0{text_version}\0{self._prompt}\0{self._top_k}"
        self.card = ModelCard(
            id=MODEL_ID,
            version=hashlib.sha256(recipe.encode()).hexdigest()[:12],
            dimension=int(prompts.shape[1]),
            space=self._space,
            input_kinds=(pb.INPUT_KIND_IMAGE,),
            description=f"EfficientNet-Lite0 ImageNet classes (top {self._top_k}) mixed in the text space of "
            f"{self._text_model_path} (version {text_version}), prompt {self._prompt!r}",
        )
        return self.card

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = self._classifier.class_logits(self._classifier.features(pixels))
        top = logits.softmax(dim=-1).topk(self._top_k, dim=-1)
        weights = top.values / top.values.sum(dim=-1, keepdim=True)
        mixed = torch.einsum("nk,nkd->nd", weights, self._prompts[top.indices])
        return torch.nn.functional.normalize(mixed, dim=-1)
