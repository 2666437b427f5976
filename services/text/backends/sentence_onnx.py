"""A sentence-transformers model run by ONNX Runtime, from its ONNX copy (onnx_export.py).

The session runs on the worker's one model thread with `threads` intra-op threads that sleep when idle
instead of spinning: on a machine whose cores the gateway, gRPC and the preparation threads share,
spinning threads took the cores from them and halved throughput (README, Performance).
"""

import hashlib
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.common.model_card import ModelCard
from services.encoder.backend import Prepared
from services.text.backends.onnx_export import OUTPUT, onnx_model
from services.text.backends.sentence_model import SentenceBackend, load_sentence_model


class OnnxSentenceBackend(SentenceBackend):
    """`int8`: serve the dynamically quantised graph instead of the fp32 one (other vectors: another
    version, and a model id of its own)."""

    def __init__(
        self,
        path: str,
        model_id: str,
        space: str,
        max_chars: int,
        cache_dir: str,
        threads: int,
        int8: bool = False,
    ) -> None:
        super().__init__(path, model_id, space, max_chars)
        self._cache_dir = Path(cache_dir)
        self._threads = threads
        self._int8 = int8

    def load(self) -> ModelCard:
        loaded = load_sentence_model(self._path)
        path = onnx_model(
            loaded.model, loaded.version, list(loaded.tokens.input_names), self._cache_dir, self._int8
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        if self._int8:
            version = hashlib.sha256(f"{loaded.version}-int8".encode()).hexdigest()[: len(loaded.version)]
            return self._card(loaded, version, "ONNX Runtime, int8 weights (dynamic quantisation)")
        return self._card(loaded, loaded.version, "ONNX Runtime, fp32")

    def encode(self, batch: list[Prepared]) -> np.ndarray:
        rows = self._session.run([OUTPUT], self._tokens.batch([p.value for p in batch]))[0]
        return np.asarray(rows, dtype=np.float32)
