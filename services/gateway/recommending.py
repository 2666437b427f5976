"""Recommend, SimilarItems, FoldIn and Fit: passed to the user-item worker, its errors kept readable.

After a Fit through the gateway the model routes are refreshed at once, so Encode of user and item ids
uses (and caches under) the new version straight away rather than after the next periodic refresh.
"""

from collections.abc import AsyncIterator

import grpc
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import recommender_pb2_grpc as rec_grpc

from services.common import metrics
from services.common.errors import DeadlineExceeded, ServiceError, Unavailable, Unimplemented
from services.gateway.routing import Router, backend_channel


class Recommendations:
    def __init__(self, address: str, router: Router, max_message_bytes: int, reconnect_max_s: float) -> None:
        self._address = address
        self._router = router
        self._channel = backend_channel(address, max_message_bytes, reconnect_max_s) if address else None
        self._stub = rec_grpc.RecommenderStub(self._channel) if self._channel else None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def _worker(self, method: str) -> rec_grpc.RecommenderStub:
        if self._stub is None:
            raise Unimplemented(
                f"Gateway.{method} needs the user-item worker, and this gateway has none (GATEWAY_USERITEM is empty)"
            )
        return self._stub

    def _translate(self, error: grpc.aio.AioRpcError) -> ServiceError:
        code, details = error.code(), error.details() or ""
        metrics.WORKER_FAILURES.labels(self._address, code.name).inc()
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"user-item worker {self._address} is unavailable ({details}); retry shortly")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"user-item worker {self._address} did not answer within the deadline")
        return ServiceError(details, code)

    async def recommend(self, request: rec.RecommendRequest, timeout: float) -> rec.RecommendResponse:
        try:
            return await self._worker("Recommend").Recommend(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self._translate(error) from None

    async def similar_items(self, request: rec.SimilarItemsRequest, timeout: float) -> rec.RecommendResponse:
        try:
            return await self._worker("SimilarItems").SimilarItems(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self._translate(error) from None

    async def fold_in(self, request: rec.FoldInRequest, timeout: float) -> rec.FoldInResponse:
        try:
            return await self._worker("FoldIn").FoldIn(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self._translate(error) from None

    async def fit(
        self, requests: AsyncIterator[rec.FitRequest], timeout: float
    ) -> AsyncIterator[rec.FitProgress]:
        call = self._worker("Fit").Fit(requests, timeout=timeout)
        try:
            async for progress in call:
                if progress.done:
                    await self._router.refresh()
                yield progress
        except grpc.aio.AioRpcError as error:
            raise self._translate(error) from None
        finally:
            call.cancel()
