"""The interface every model backend implements, text, image or user-item alike.

A backend splits its work in three stages so they can overlap on different threads: `prepare`
(validate, tokenise or decode one request's inputs), `encode` (the model call on a micro-batch of
prepared inputs from many requests), and the shaping of vectors, which the servicer does for all.
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from embeddings.v1 import types_pb2 as pb


@dataclass(frozen=True)
class ModelCard:
    """What a loaded model is: reported by ListModels and named in every response."""

    id: str
    version: str
    dimension: int
    space: str
    input_kinds: tuple[int, ...]
    max_input_tokens: int = 0
    description: str = ""

    def to_proto(self) -> pb.ModelInfo:
        return pb.ModelInfo(
            id=self.id,
            version=self.version,
            dimension=self.dimension,
            space=self.space,
            input_kinds=list(self.input_kinds),
            max_input_tokens=self.max_input_tokens,
            description=self.description,
        )

    @classmethod
    def from_proto(cls, info: pb.ModelInfo) -> "ModelCard":
        return cls(
            id=info.id,
            version=info.version,
            dimension=info.dimension,
            space=info.space,
            input_kinds=tuple(info.input_kinds),
            max_input_tokens=info.max_input_tokens,
            description=info.description,
        )

    def ref(self) -> pb.ModelRef:
        return pb.ModelRef(id=self.id, version=self.version, space=self.space)


@dataclass
class Prepared:
    """One input ready for the model: what `encode` consumes plus what the response reports."""

    value: Any
    tokens: int = 0
    truncated: bool = False


class EncoderBackend(ABC):
    """One model. `load`, `prepare` and `encode` block: the servicer runs them off the event loop."""

    @abstractmethod
    def load(self) -> ModelCard:
        """Load the weights from a local path; return the card (raises if the weights are missing)."""

    @abstractmethod
    def prepare(self, inputs: Sequence[pb.Input], strict: bool) -> list[Prepared]:
        """Validate and pre-process one request's inputs; InvalidArgument names the bad input's index.

        `strict`: refuse inputs longer than the model's limit instead of truncating them.
        """

    @abstractmethod
    def encode(self, batch: list[Prepared]) -> np.ndarray:
        """The model's full float32 output, one row per prepared input."""

    @abstractmethod
    def probe_input(self) -> pb.Input:
        """A valid input used to check the model works before the worker reports SERVING."""
