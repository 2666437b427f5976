"""A sentence-transformers model run by torch, on the token ids `prepare` made."""

import numpy as np
import torch

from services.common.model_card import ModelCard
from services.encoder.backend import Prepared
from services.text.backends.sentence_model import SentenceBackend, load_sentence_model


class SentenceTransformerBackend(SentenceBackend):
    def load(self) -> ModelCard:
        loaded = load_sentence_model(self._path)
        self._model = loaded.model
        return self._card(loaded, loaded.version, "torch")

    def encode(self, batch: list[Prepared]) -> np.ndarray:
        features = {
            name: torch.from_numpy(array)
            for name, array in self._tokens.batch([p.value for p in batch]).items()
        }
        with torch.inference_mode():
            rows = self._model(features)["sentence_embedding"]
        return rows.float().numpy()
