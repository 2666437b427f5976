"""The Encoder servicer every worker runs, over the worker's model source (models.py).

It validates requests, picks the model, has it encode the inputs, shapes the vectors as the options ask
and answers; EncodeStream handles a window of requests at once and answers in order.
"""

from collections.abc import AsyncIterator, Sequence

import grpc
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc as enc_grpc
from embeddings.v1 import types_pb2 as pb

from services.common.callers import CALLER
from services.common.errors import InvalidArgument
from services.common.inputs import FIELD_OF_KIND, check_batch_size, kind_name, kind_of
from services.common.streaming import ordered_pipeline
from services.common.vectors import check_options, shape
from services.encoder.models import ModelSource, ServedModel


class EncoderService(enc_grpc.EncoderServicer):
    def __init__(self, source: ModelSource, max_inputs_per_request: int, stream_window: int) -> None:
        self._source = source
        self._max_inputs = max_inputs_per_request
        self._stream_window = stream_window

    async def start(self) -> None:
        await self._source.start()

    async def close(self) -> None:
        await self._source.close()

    async def ListModels(
        self, request: enc.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> enc.ListModelsResponse:
        return enc.ListModelsResponse(models=[model.card.to_proto() for model in self._source.models()])

    async def Encode(
        self, request: enc.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> enc.EncodeResponse:
        return await self._encode(request, context.time_remaining())

    async def EncodeStream(
        self, request_iterator: AsyncIterator[enc.EncodeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[enc.EncodeResponse]:
        async def handle(request: enc.EncodeRequest) -> enc.EncodeResponse:
            return await self._encode(request, context.time_remaining())

        async for response in ordered_pipeline(request_iterator, handle, self._stream_window):
            yield response

    async def _encode(self, request: enc.EncodeRequest, timeout: float | None) -> enc.EncodeResponse:
        check_batch_size(request.inputs, self._max_inputs)
        kinds = [kind_of(item, index) for index, item in enumerate(request.inputs)]
        model = self._source.pick(request.model, set(kinds))
        _check_kinds(model, kinds)
        check_options(request.options, model.card.dimension, model.card.id)
        rows, prepared = await model.encode(request.inputs, request.options.strict, timeout, CALLER.get())
        vectors = shape(rows, request.options)
        return enc.EncodeResponse(
            model=model.card.ref(),
            request_id=request.request_id,
            embeddings=[
                pb.Embedding(vector=vector, truncated=item.truncated, input_tokens=item.tokens)
                for vector, item in zip(vectors, prepared, strict=True)
            ],
        )


def _check_kinds(model: ServedModel, kinds: Sequence[int]) -> None:
    """Every input is of a kind the model accepts; the refusal names the first that is not."""
    accepted = model.card.input_kinds
    for index, kind in enumerate(kinds):
        if kind not in accepted:
            raise InvalidArgument(
                f"is {kind_name(kind)}; model {model.card.id!r} accepts "
                f"{' and '.join(FIELD_OF_KIND[k] for k in accepted)} inputs and does not accept "
                f"{kind_name(kind)} inputs",
                field=f"inputs[{index}]",
            )
