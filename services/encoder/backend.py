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

from services.common.model_card import ModelCard


@dataclass
class Prepared:
    """One input ready for the model: what `encode` consumes plus what the response reports."""

    value: Any
    tokens: int = 0
    truncated: bool = False


class EncoderBackend(ABC):
    """One model. `load`, `prepare` and `encode` block: the servicer runs them off the event loop.

    `lanes`: how many `encode` calls the backend runs well at once, each on a thread of its own (the
    worker's batcher runs up to that many batches concurrently); 1 unless the backend says otherwise.
    """

    lanes: int = 1

    @abstractmethod
    def load(self) -> ModelCard:
        """Load the weights from a local path; return the card (raises if the weights are missing)."""

    @abstractmethod
    def prepare(self, inputs: Sequence[pb.Input], strict: bool) -> list[Prepared]:
        """Validate and pre-process one request's inputs; InvalidArgument names the bad input's index.

        `strict`: refuse inputs longer than the model's limit instead of truncating them.
        """

    def cost(self, item: pb.Input) -> int:
        """What preparing `item` costs, in the unit the worker's admission counts (characters of text,
        pixels of images); cheap, and computed before anything is decoded or tokenised."""
        return 1

    @abstractmethod
    def encode(self, batch: list[Prepared]) -> np.ndarray:
        """The model's full float32 output, one row per prepared input."""

    @abstractmethod
    def probe_input(self) -> pb.Input:
        """A valid input used to check the model works before the worker reports SERVING."""
