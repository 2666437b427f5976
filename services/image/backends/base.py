"""What every image backend shares: decoding and the backend's own transform in `prepare` (preparation
thread), one stacked forward pass in `encode` (model thread)."""

import io
from abc import abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import torch
from embeddings.v1 import types_pb2 as pb
from PIL import Image

from services.common.errors import InvalidArgument
from services.encoder.backend import EncoderBackend, Prepared
from services.image.decoding import ImageLimits, decode_image, header_pixels

Transform = Callable[[Image.Image], torch.Tensor]


class ImageBackend(EncoderBackend):
    """Subclasses set `transform` and `input_side` in `load` and implement `forward`."""

    transform: Transform
    input_side: int

    def __init__(self, limits: ImageLimits) -> None:
        self._limits = limits

    def cost(self, item: pb.Input) -> int:
        """Pixels, from the header: what decoding costs (an image over the limit costs the limit: it is
        refused once its header is read, before it is decoded)."""
        return min(header_pixels(item.image), self._limits.max_pixels)

    def prepare(self, inputs: Sequence[pb.Input], strict: bool) -> list[Prepared]:
        prepared = []
        for index, item in enumerate(inputs):
            if item.WhichOneof("content") != "image":
                raise InvalidArgument(
                    "is not an image; this model accepts images only", field=f"inputs[{index}]"
                )
            picture = decode_image(item.image, index, self._limits, draft_side=self.input_side)
            prepared.append(Prepared(self.transform(picture)))
        return prepared

    def encode(self, batch: list[Prepared]) -> np.ndarray:
        with torch.inference_mode():
            return self.forward(torch.stack([item.value for item in batch])).float().numpy()

    @abstractmethod
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Vectors of a batch of transformed images (N, 3, H, W)."""

    def probe_input(self) -> pb.Input:
        gradient = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(gradient).save(buffer, format="PNG")
        return pb.Input(image=buffer.getvalue())
