"""The Encoder contract on the user-item worker: user_id and item_id inputs to their learnt vectors."""

from collections.abc import AsyncIterator

import grpc
import numpy as np
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc as enc_grpc
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument
from services.common.inputs import check_batch_size, kind_name, kind_of
from services.common.vectors import check_options, shape
from services.useritem.catalog import Catalog, item_row, user_row


class UserItemEncoder(enc_grpc.EncoderServicer):
    def __init__(self, catalog: Catalog, max_inputs: int) -> None:
        self._catalog = catalog
        self._max_inputs = max_inputs

    async def ListModels(
        self, request: enc.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> enc.ListModelsResponse:
        return enc.ListModelsResponse(models=[model.card.to_proto() for model in self._catalog.models])

    async def Encode(
        self, request: enc.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> enc.EncodeResponse:
        check_batch_size(request.inputs, self._max_inputs)
        model = self._catalog.get(request.model)
        check_options(request.options, model.factors, model.name)
        rows = []
        for index, item in enumerate(request.inputs):
            kind = kind_of(item, index)
            if kind == pb.INPUT_KIND_USER:
                rows.append(model.user_vectors[user_row(model, item.user_id, f"inputs[{index}].user_id")])
            elif kind == pb.INPUT_KIND_ITEM:
                rows.append(model.item_vectors[item_row(model, item.item_id, f"inputs[{index}].item_id")])
            else:
                raise InvalidArgument(
                    f"inputs[{index}] is {kind_name(kind)}; model {model.name!r} accepts user_id and item_id inputs"
                )
        vectors = shape(np.stack(rows), request.options)
        return enc.EncodeResponse(
            model=model.card.ref(),
            request_id=request.request_id,
            embeddings=[pb.Embedding(vector=vector) for vector in vectors],
        )

    async def EncodeStream(
        self, request_iterator: AsyncIterator[enc.EncodeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[enc.EncodeResponse]:
        async for request in request_iterator:
            yield await self.Encode(request, context)
