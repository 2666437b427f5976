"""The models an Encoder servicer serves, and where they come from.

A `ModelSource` lists its models and picks the one a request is for; a `ServedModel` turns one request's
inputs into the model's raw float32 rows. Two sources exist: `LoadedModels`, the fixed list of model
backends a text or image worker loads at start and runs on micro-batches, and the user-item worker's
trained versions, which change with every Fit (services/useritem/encoding.py).
"""

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument, Unavailable
from services.common.inputs import kind_name
from services.common.model_card import ModelCard
from services.encoder.backend import EncoderBackend, Prepared
from services.encoder.batching import MicroBatcher
from services.encoder.preparing import PrepareLimits, Preparer

log = logging.getLogger("encoder")


class ServedModel(ABC):
    """One model as the servicer uses it."""

    card: ModelCard

    @abstractmethod
    async def encode(
        self, inputs: Sequence[pb.Input], strict: bool, timeout: float | None, caller: str
    ) -> tuple[np.ndarray, Sequence[Prepared]]:
        """The raw rows of `inputs` (one per input, in order) and what each input's answer reports
        (tokens, truncation); refusals name the input as `inputs[i]`. `caller`: whose request it is
        (callers.py), for a fair share of the worker."""


class ModelSource(ABC):
    """The models one worker serves."""

    @abstractmethod
    def models(self) -> list[ServedModel]:
        """Every model served now (empty while loading)."""

    @abstractmethod
    def pick(self, name: str, kinds: set[int]) -> ServedModel:
        """The model `name`, or (empty name) the one this worker uses for inputs of `kinds`."""

    @abstractmethod
    async def start(self) -> None:
        """Make the models ready (load weights, start batchers)."""

    @abstractmethod
    async def close(self) -> None:
        """Release what `start` took."""


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int
    max_wait_s: float
    max_queue: int
    max_batch_tokens: int = 0  # 0: batches are limited by their number of inputs only


def padded_length(item: Prepared) -> int:
    """What the model pads an input from: its tokens (text); 1 for inputs of one size (images)."""
    return max(1, item.tokens)


class BatchedModel(ServedModel):
    """A model backend behind a micro-batcher: each request is admitted and prepared (preparing.py), then
    its inputs join the batches the model thread runs."""

    def __init__(
        self, backend: EncoderBackend, card: ModelCard, batcher: MicroBatcher, preparer: Preparer
    ) -> None:
        self.backend = backend
        self.card = card
        self.batcher = batcher
        self._preparer = preparer

    async def encode(
        self, inputs: Sequence[pb.Input], strict: bool, timeout: float | None, caller: str
    ) -> tuple[np.ndarray, Sequence[Prepared]]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        prepared = await self._preparer.prepare(self.backend, inputs, strict, timeout, caller)
        left = None if timeout is None else timeout - (loop.time() - started)
        rows = await self.batcher.submit(prepared, left, caller)
        return np.stack(rows), prepared


class LoadedModels(ModelSource):
    """The fixed list of backends a worker loads at start, each with its micro-batcher."""

    def __init__(
        self, name: str, backends: Sequence[EncoderBackend], limits: BatchLimits, preparing: PrepareLimits
    ) -> None:
        self._backends = list(backends)
        self._limits = limits
        self._models: dict[str, BatchedModel] = {}
        # As many model threads as the backend with the most lanes runs batches at once (one, unless a
        # backend runs concurrent calls well): models take turns on them instead of oversubscribing the cores.
        lanes = max((backend.lanes for backend in self._backends), default=1)
        self._model_thread = ThreadPoolExecutor(lanes, thread_name_prefix="model")
        self._preparer = Preparer(name, preparing)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    async def start(self) -> None:
        """Load every backend, start its batcher, and prove it encodes (raises if one does not).

        The models are published (ListModels, Encode) only once all of them work, so a router never
        learns a partial list from a worker that is still loading.
        """
        loop = asyncio.get_running_loop()
        loaded: dict[str, BatchedModel] = {}
        for backend in self._backends:
            card = await loop.run_in_executor(self._model_thread, backend.load)
            batcher: MicroBatcher = MicroBatcher(
                card.id,
                backend.encode,
                self._model_thread,
                max_batch_size=self._limits.max_batch_size,
                max_wait_s=self._limits.max_wait_s,
                max_queue=self._limits.max_queue,
                max_batch_tokens=self._limits.max_batch_tokens,
                length=padded_length,
                lanes=backend.lanes,
            )
            batcher.start()
            model = BatchedModel(backend, card, batcher, self._preparer)
            rows, _ = await model.encode([backend.probe_input()], strict=False, timeout=None, caller="probe")
            if rows.shape != (1, card.dimension) or not np.all(np.isfinite(rows)):
                raise RuntimeError(f"model {card.id} failed its probe encode: shape {rows.shape[1:]}")
            loaded[card.id] = model
            log.info(
                "loaded %s (version %s, %d-d, space %s)", card.id, card.version, card.dimension, card.space
            )
        self._models = loaded

    async def close(self) -> None:
        self._preparer.close()
        for model in self._models.values():
            await model.batcher.close()
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    def pick(self, name: str, kinds: set[int]) -> ServedModel:
        if not self._models:
            raise Unavailable("the worker is still loading its models; retry shortly")
        if name:
            model = self._models.get(name)
            if model is None:
                raise InvalidArgument(
                    f"unknown model {name!r}; this worker serves: {', '.join(self._models)}"
                )
            return model
        for model in self._models.values():
            if kinds <= set(model.card.input_kinds):
                return model
        raise InvalidArgument(
            f"no model on this worker accepts {' and '.join(kind_name(k) for k in sorted(kinds))} inputs"
            f" (in one request); models here: {', '.join(self._models)}"
        )
