"""A sentence-transformers model run by ONNX Runtime, from its ONNX copy (onnx_export.py).

Its threads sleep when idle instead of spinning: on a machine whose cores the gateway, gRPC and the
preparation threads share, spinning threads took the cores from them and halved throughput (README,
Performance). A batch runs on `threads` intra-op threads (one per core), the lowest latency for a lone
caller. With `lanes` > 1 (off by default), a batch that starts while another runs goes to a second,
single-threaded session, so under load batches run side by side, one core each, instead of taking turns
on threads that wait for each other at every operator: 9-11% more requests/s at 64 clients, but lone
requests were 10-17% slower once the worker had been under load (README, Performance). The second
session holds a second copy of the weights (about 90 MB for all-MiniLM-L6-v2).
"""

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.common.model_card import ModelCard
from services.encoder.backend import Prepared
from services.text.backends.onnx_export import OUTPUT, onnx_model
from services.text.backends.sentence_model import SentenceBackend, load_sentence_model


class OnnxSentenceBackend(SentenceBackend):
    """`int8`: serve the dynamically quantised graph instead of the fp32 one (other vectors: another
    version, and a model id of its own); `lanes`: most batches run at once (0: one per core)."""

    def __init__(
        self,
        path: str,
        model_id: str,
        space: str,
        max_chars: int,
        cache_dir: str,
        threads: int,
        int8: bool = False,
        lanes: int = 1,
    ) -> None:
        super().__init__(path, model_id, space, max_chars)
        self._cache_dir = Path(cache_dir)
        self._threads = threads or os.cpu_count() or 1
        self._int8 = int8
        self.lanes = lanes or os.cpu_count() or 1
        self._busy = 0
        self._busy_lock = threading.Lock()

    def load(self) -> ModelCard:
        loaded = load_sentence_model(self._path)
        path = onnx_model(
            loaded.model, loaded.version, list(loaded.tokens.input_names), self._cache_dir, self._int8
        )
        self._session = _session(path, self._threads)
        self._side_session = _session(path, 1) if self.lanes > 1 else self._session
        if self._int8:
            version = hashlib.sha256(f"{loaded.version}-int8".encode()).hexdigest()[: len(loaded.version)]
            return self._card(loaded, version, "ONNX Runtime, int8 weights (dynamic quantisation)")
        return self._card(loaded, loaded.version, "ONNX Runtime, fp32")

    def encode(self, batch: list[Prepared]) -> np.ndarray:
        feeds = self._tokens.batch([p.value for p in batch])
        with self._busy_lock:
            session = self._session if self._busy == 0 else self._side_session
            self._busy += 1
        try:
            rows = session.run([OUTPUT], feeds)[0]
        finally:
            with self._busy_lock:
                self._busy -= 1
        return np.asarray(rows, dtype=np.float32)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
