"""The text tower of an open_clip CLIP model, from a local checkpoint (CLIP_* settings)."""

import copy
from collections.abc import Sequence

import numpy as np
import torch
from embeddings.v1 import types_pb2 as pb

from services.common.model_card import ModelCard
from services.encoder.backend import Prepared
from services.encoder.clip import load_clip, tower_card
from services.encoder.settings import ClipSettings
from services.text.backends.text_inputs import TextBackend, texts_of, too_long


class ClipTextBackend(TextBackend):
    def __init__(self, settings: ClipSettings, max_chars: int) -> None:
        self._settings = settings
        self._max_chars = max_chars

    def load(self) -> ModelCard:
        clip = load_clip(self._settings)
        clip.model.visual = None  # this worker only ever runs the text tower
        self._model = clip.model
        self._tokenizer = clip.tokenizer
        # Hugging Face tokenizers keep per-call state: counting (prepare thread) gets its own copy.
        self._counting_tokenizer = copy.deepcopy(clip.tokenizer)
        self._context = int(clip.tokenizer.context_length)
        self.card = tower_card(self._settings, clip, "text", pb.INPUT_KIND_TEXT, self._context)
        return self.card

    def _count_tokens(self, text: str) -> int:
        """Tokens including the start and end markers the tokenizer adds."""
        if hasattr(self._counting_tokenizer, "encode"):
            return len(self._counting_tokenizer.encode(text)) + 2
        return len(self._counting_tokenizer.tokenizer(text)["input_ids"])

    def prepare(self, inputs: Sequence[pb.Input], strict: bool) -> list[Prepared]:
        prepared = []
        for index, text in enumerate(texts_of(inputs, self.card.id, self._max_chars)):
            count = self._count_tokens(text)
            if strict and count > self._context:
                raise too_long(index, count, self._context, self.card.id)
            prepared.append(Prepared(text, min(count, self._context), count > self._context))
        return prepared

    def encode(self, batch: list[Prepared]) -> np.ndarray:
        tokens = self._tokenizer([item.value for item in batch])
        with torch.inference_mode():
            return self._model.encode_text(tokens).float().numpy()

    def probe_input(self) -> pb.Input:
        return pb.Input(text="a photo of a cat")
