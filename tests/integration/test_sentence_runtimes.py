"""The sentence model on its two runtimes, in this process: the token ids `prepare` gives are the ones
sentence-transformers makes, and the ONNX Runtime vectors equal torch's and sentence-transformers' own,
long (truncated) texts included; the int8 variant is close, and a model of its own."""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.text.backends.sentence_onnx import OnnxSentenceBackend
from services.text.backends.sentence_transformer import SentenceTransformerBackend
from tests.helpers import cosine, texts

pytestmark = pytest.mark.integration

PARAGRAPH = (
    "The gateway looks every input up in the cache, sends only the misses to a worker, writes the new "
    "vectors back and answers in the order of the request. Workers gather concurrent requests into batches "
    "formed by tokens, grouped by length so that little padding is computed, and run the model off the "
    "event loop. "
)
TEXTS = [
    "A man is eating food.",
    "The new movie is awesome!",
    "  Leading and trailing   spaces  ",
    "Ein Hund läuft über die Wiese. 🐕",
    "東京は日本の首都です。",
    "word " * 400,  # 402 tokens: cut to 256
    PARAGRAPH * 6,  # about 400 tokens of prose: cut to 256
    PARAGRAPH * 2,  # about 130 tokens: not cut, much longer than the others in its batch
    "x",
    "Kubernetes schedules pods onto nodes; the scheduler weighs resources, affinity and taints.",
]
MAX_TOKENS = 256


@pytest.fixture(scope="module")
def torch_backend() -> SentenceTransformerBackend:
    backend = SentenceTransformerBackend("", "all-MiniLM-L6-v2", "minilm", 50_000)
    backend.load()
    return backend


@pytest.fixture(scope="module")
def onnx_backend(text_cache_dir: Path) -> OnnxSentenceBackend:
    backend = OnnxSentenceBackend("", "all-MiniLM-L6-v2", "minilm", 50_000, str(text_cache_dir), 0)
    backend.load()
    return backend


def test_prepare_gives_the_token_ids_sentence_transformers_makes(torch_backend, minilm) -> None:  # type: ignore[no-untyped-def]
    prepared = torch_backend.prepare(texts(*TEXTS), strict=False)
    features = minilm.preprocess(TEXTS)
    for item, ids, mask in zip(prepared, features["input_ids"], features["attention_mask"], strict=True):
        assert item.value.tolist() == ids[mask.bool()].tolist()
        assert item.tokens == len(item.value) <= MAX_TOKENS
    assert [item.truncated for item in prepared] == [len(item.value) == MAX_TOKENS for item in prepared]
    assert sum(item.truncated for item in prepared) == 2


@pytest.mark.parametrize("batch_size", [1, 3, len(TEXTS)])
def test_onnx_vectors_equal_torch_and_sentence_transformers(
    torch_backend, onnx_backend, minilm, batch_size: int
) -> None:  # type: ignore[no-untyped-def]
    expected = minilm.encode(TEXTS, convert_to_numpy=True)
    for backend in (torch_backend, onnx_backend):
        prepared = backend.prepare(texts(*TEXTS), strict=False)
        got = np.concatenate(
            [backend.encode(prepared[i : i + batch_size]) for i in range(0, len(prepared), batch_size)]
        )
        assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
        assert np.all(cosine(got, expected) >= 0.9999), type(backend).__name__
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_the_onnx_copy_is_kept_by_the_weights_hash_and_reused(onnx_backend, text_cache_dir: Path) -> None:  # type: ignore[no-untyped-def]
    (exported,) = (text_cache_dir / "onnx").glob(f"{onnx_backend.card.version}-*/model.onnx")
    stamp = os.stat(exported).st_mtime_ns
    again = OnnxSentenceBackend("", "all-MiniLM-L6-v2", "minilm", 50_000, str(text_cache_dir), 1)
    assert again.load() == onnx_backend.card
    assert os.stat(exported).st_mtime_ns == stamp  # loaded, not exported again
    assert not list(exported.parent.glob(".partial-*"))


def test_the_int8_variant_is_close_and_a_model_of_its_own(onnx_backend, text_cache_dir: Path) -> None:  # type: ignore[no-untyped-def]
    int8 = OnnxSentenceBackend(
        "", "all-MiniLM-L6-v2-int8", "minilm", 50_000, str(text_cache_dir), 0, int8=True
    )
    card = int8.load()
    assert card.id == "all-MiniLM-L6-v2-int8" and card.version != onnx_backend.card.version
    assert (card.dimension, card.space, card.max_input_tokens) == (384, "minilm", MAX_TOKENS)
    fp32 = onnx_backend.encode(onnx_backend.prepare(texts(*TEXTS), strict=False))
    got = int8.encode(int8.prepare(texts(*TEXTS), strict=False))
    agreement = cosine(got, fp32)
    assert agreement.mean() >= 0.98 and agreement.min() >= 0.95
    assert not np.allclose(got, fp32, atol=1e-4)  # it is the quantised graph, not the fp32 one again


class _HeldSession:
    """An ONNX Runtime session whose runs wait for `release` (bounded), counting them."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.runs = 0
        self.release = threading.Event()

    def run(self, *args: Any) -> Any:
        self.runs += 1
        self.release.wait(10)
        return self.session.run(*args)


def test_with_two_lanes_a_batch_that_starts_while_another_runs_takes_the_second_session(
    onnx_backend, text_cache_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    laned = OnnxSentenceBackend("", "all-MiniLM-L6-v2", "minilm", 50_000, str(text_cache_dir), 0, lanes=2)
    assert laned.load() == onnx_backend.card and laned.lanes == 2
    prepared = laned.prepare(texts(*TEXTS), strict=False)
    expected = onnx_backend.encode(prepared)
    main, side = _HeldSession(laned._session), _HeldSession(laned._side_session)
    side.release.set()
    laned._session, laned._side_session = main, side
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(laned.encode, prepared[:4])
        while not main.runs:
            threading.Event().wait(0.001)
        second = pool.submit(laned.encode, prepared[4:])  # starts while the first runs: the side session
        rows_second = second.result(10)
        main.release.set()
        rows_first = first.result(10)
    assert (main.runs, side.runs) == (1, 1)
    assert np.all(cosine(np.concatenate([rows_first, rows_second]), expected) >= 0.9999)
    assert np.allclose(laned.encode(prepared), expected, atol=1e-5)  # alone again: the main session
    assert (main.runs, side.runs) == (2, 1)
