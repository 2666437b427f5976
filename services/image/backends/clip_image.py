"""The image tower of an open_clip CLIP model, from the same local checkpoint (CLIP_* settings) as the
text worker's CLIP text tower: both write into one space."""

import torch
from embeddings.v1 import types_pb2 as pb

from services.common.model_card import ModelCard
from services.encoder.clip import load_clip, tower_card
from services.encoder.settings import ClipSettings
from services.image.backends.base import ImageBackend
from services.image.decoding import ImageLimits


class ClipImageBackend(ImageBackend):
    def __init__(self, settings: ClipSettings, limits: ImageLimits) -> None:
        super().__init__(limits)
        self._settings = settings

    def load(self) -> ModelCard:
        clip = load_clip(self._settings)
        self._model = clip.model
        self.transform = clip.preprocess
        size = getattr(clip.model.visual, "image_size", 224)
        self.input_side = int(size[0] if isinstance(size, tuple | list) else size)
        self.card = tower_card(self._settings, clip, "image", pb.INPUT_KIND_IMAGE)
        return self.card

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._model.encode_image(pixels)
