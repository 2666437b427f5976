"""The Encoder servicer every worker runs: one micro-batcher per model, behind the shared contract.

The worker supplies backends (model code); this module validates requests, pre-processes them on a
preparation thread, batches them onto the model thread, shapes the vectors and answers.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc as enc_grpc
from embeddings.v1 import types_pb2 as pb

from services.common.backend import EncoderBackend, ModelCard
from services.common.batching import MicroBatcher
from services.common.errors import InvalidArgument, Unavailable
from services.common.inputs import check_batch_size, kind_name, kind_of
from services.common.streaming import ordered_pipeline
from services.common.vectors import check_options, shape

log = logging.getLogger("encoder")


@dataclass(frozen=True)
class BatchLimits:
    max_inputs_per_request: int
    max_batch_size: int
    max_wait_s: float
    max_queue: int
    stream_window: int


class _LoadedModel:
    def __init__(self, backend: EncoderBackend, card: ModelCard, batcher: MicroBatcher) -> None:
        self.backend = backend
        self.card = card
        self.batcher = batcher


class EncoderService(enc_grpc.EncoderServicer):
    def __init__(self, backends: Sequence[EncoderBackend], limits: BatchLimits) -> None:
        self._backends = list(backends)
        self._limits = limits
        self._models: dict[str, _LoadedModel] = {}
        # One model thread: models take turns on the cores instead of oversubscribing them.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._prepare_thread = ThreadPoolExecutor(1, thread_name_prefix="prepare")

    @property
    def cards(self) -> list[ModelCard]:
        return [model.card for model in self._models.values()]

    async def start(self) -> None:
        """Load every backend, start its batcher, and prove it encodes (raises if one does not).

        The models are published (ListModels, Encode) only once all of them work, so a router never
        learns a partial list from a worker that is still loading.
        """
        loop = asyncio.get_running_loop()
        loaded: dict[str, _LoadedModel] = {}
        for backend in self._backends:
            card = await loop.run_in_executor(self._model_thread, backend.load)
            batcher: MicroBatcher = MicroBatcher(
                card.id,
                backend.encode,
                self._model_thread,
                max_batch_size=self._limits.max_batch_size,
                max_wait_s=self._limits.max_wait_s,
                max_queue=self._limits.max_queue,
            )
            batcher.start()
            model = _LoadedModel(backend, card, batcher)
            probe = await self._encode_raw(model, [backend.probe_input()], strict=False, timeout=None)
            vector = probe[0][0]
            if vector.shape != (card.dimension,) or not np.all(np.isfinite(vector)):
                raise RuntimeError(f"model {card.id} failed its probe encode: shape {vector.shape}")
            loaded[card.id] = model
            log.info(
                "loaded %s (version %s, %d-d, space %s)", card.id, card.version, card.dimension, card.space
            )
        self._models = loaded

    async def close(self) -> None:
        for model in self._models.values():
            await model.batcher.close()
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self._prepare_thread.shutdown(wait=False, cancel_futures=True)

    async def ListModels(
        self, request: enc.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> enc.ListModelsResponse:
        return enc.ListModelsResponse(models=[card.to_proto() for card in self.cards])

    async def Encode(
        self, request: enc.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> enc.EncodeResponse:
        return await self._encode(request, context.time_remaining())

    async def EncodeStream(
        self, request_iterator: AsyncIterator[enc.EncodeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[enc.EncodeResponse]:
        async def handle(request: enc.EncodeRequest) -> enc.EncodeResponse:
            return await self._encode(request, context.time_remaining())

        async for response in ordered_pipeline(request_iterator, handle, self._limits.stream_window):
            yield response

    async def _encode(self, request: enc.EncodeRequest, timeout: float | None) -> enc.EncodeResponse:
        check_batch_size(request.inputs, self._limits.max_inputs_per_request)
        model = self._pick(request)
        check_options(request.options, model.card.dimension, model.card.id)
        rows, prepared = await self._encode_raw(model, request.inputs, request.options.strict, timeout)
        vectors = shape(np.stack(rows), request.options)
        return enc.EncodeResponse(
            model=model.card.ref(),
            request_id=request.request_id,
            embeddings=[
                pb.Embedding(vector=vector, truncated=item.truncated, input_tokens=item.tokens)
                for vector, item in zip(vectors, prepared, strict=True)
            ],
        )

    async def _encode_raw(
        self, model: _LoadedModel, inputs: Sequence[pb.Input], strict: bool, timeout: float | None
    ) -> tuple[list[np.ndarray], list]:
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._prepare_thread, model.backend.prepare, inputs, strict)
        rows = await model.batcher.submit(prepared, timeout)
        return rows, prepared

    def _pick(self, request: enc.EncodeRequest) -> _LoadedModel:
        if not self._models:
            raise Unavailable("the worker is still loading its models; retry shortly")
        kinds = {kind_of(item, i) for i, item in enumerate(request.inputs)}
        if request.model:
            model = self._models.get(request.model)
            if model is None:
                raise InvalidArgument(
                    f"unknown model {request.model!r}; this worker serves: {', '.join(self._models)}"
                )
            refused = kinds - set(model.card.input_kinds)
            if refused:
                raise InvalidArgument(
                    f"model {model.card.id!r} does not accept {', '.join(kind_name(k) for k in refused)} inputs; "
                    f"it accepts {', '.join(kind_name(k) for k in model.card.input_kinds)}"
                )
            return model
        for model in self._models.values():
            if kinds <= set(model.card.input_kinds):
                return model
        raise InvalidArgument(
            f"no model on this worker accepts {' and '.join(kind_name(k) for k in sorted(kinds))} inputs"
            f" (in one request); models here: {', '.join(self._models)}"
        )
