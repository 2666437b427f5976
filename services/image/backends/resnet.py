"""A torchvision ResNet (resnet18 / resnet50) from a local state dict: pooled features (512 / 2048-d).

No ImageNet ResNet weights install from the package index: the operator gives the file, or torchvision's
own cache holds it (where this machine has downloaded it before); nothing is downloaded here.
"""

from pathlib import Path

import torch
from embeddings.v1 import types_pb2 as pb
from torch import nn
from torchvision import models

from services.common.model_card import ModelCard
from services.encoder.weights import content_version
from services.image.backends.base import ImageBackend
from services.image.decoding import ImageLimits

ARCHITECTURES = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2, 2048),
}


def torchvision_cache_file(weights: models.WeightsEnum) -> Path:
    """Where torchvision keeps these weights once downloaded (torch.hub's checkpoints folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


class ResNetBackend(ImageBackend):
    def __init__(self, architecture: str, checkpoint: str, limits: ImageLimits) -> None:
        super().__init__(limits)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"IMAGE_RESNET_MODEL={architecture!r}; use one of {', '.join(ARCHITECTURES)}")
        self._architecture = architecture
        self._checkpoint = checkpoint

    def load(self) -> ModelCard:
        build, weights, dimension = ARCHITECTURES[self._architecture]
        path = Path(self._checkpoint) if self._checkpoint else torchvision_cache_file(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"no {self._architecture} weights at {path}: set IMAGE_RESNET_CHECKPOINT to a local state dict "
                f"(e.g. torchvision's {Path(weights.url).name}); weights are not downloaded"
            )
        network = build(weights=None)
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        network.fc = nn.Identity()
        self._network = network.eval()
        transform = weights.transforms()
        self.transform = transform
        self.input_side = int(transform.resize_size[0])
        self.card = ModelCard(
            id=self._architecture,
            version=content_version(path),
            dimension=dimension,
            space=self._architecture,
            input_kinds=(pb.INPUT_KIND_IMAGE,),
            description=f"torchvision {self._architecture} pooled features from {path}",
        )
        return self.card

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._network(pixels)
