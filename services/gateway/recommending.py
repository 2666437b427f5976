"""Recommend, Score, SimilarItems, FoldIn and Fit: passed to the user-item worker, its errors kept readable.

After a Fit through the gateway the model routes are refreshed at once, so Encode of user and item ids
uses (and caches under) the new version straight away rather than after the next periodic refresh.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from embeddings.v1 import content_pb2 as cpb
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import recommender_pb2_grpc as rec_grpc
from google.protobuf.message import Message

from services.common.errors import ServiceError, Unimplemented
from services.gateway import metrics
from services.gateway.channels import BackendChannels
from services.gateway.relaying import relayed
from services.gateway.routing import Router


class Recommendations:
    def __init__(self, address: str, router: Router, channels: BackendChannels) -> None:
        self._address = address
        self._router = router
        self._channel = channels.open(address) if address else None
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

    def _relayed(self, error: grpc.aio.AioRpcError) -> ServiceError:
        metrics.WORKER_FAILURES.labels(self._address, error.code().name).inc()
        return relayed(error, f"user-item worker {self._address}")

    async def _unary(self, method: str, request: Message, timeout: float) -> Any:
        """Call the worker's unary `method`, its failures translated."""
        try:
            return await getattr(self._worker(method), method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self._relayed(error) from None

    async def recommend(self, request: rec.RecommendRequest, timeout: float) -> rec.RecommendResponse:
        return await self._unary("Recommend", request, timeout)

    async def score(self, request: rec.ScoreRequest, timeout: float) -> rec.ScoreResponse:
        return await self._unary("Score", request, timeout)

    async def similar_items(self, request: rec.SimilarItemsRequest, timeout: float) -> rec.RecommendResponse:
        return await self._unary("SimilarItems", request, timeout)

    async def fold_in(self, request: rec.FoldInRequest, timeout: float) -> rec.FoldInResponse:
        return await self._unary("FoldIn", request, timeout)

    async def fold_in_items(self, request: cpb.FoldInItemsRequest, timeout: float) -> cpb.FoldInItemsResponse:
        return await self._unary("FoldInItems", request, timeout)

    async def fit(
        self, requests: AsyncIterator[rec.FitRequest], timeout: float
    ) -> AsyncIterator[rec.FitProgress]:
        """Relay a Fit: the caller's messages are written to the worker by a sender task while the
        worker's progress is read here, so the worker's own status (say, INVALID_ARGUMENT for a bad
        interaction sent while more were on the way) is what the caller gets."""
        call = self._worker("Fit").Fit(timeout=timeout)
        sender = asyncio.ensure_future(_send(requests, call))
        try:
            while (progress := await call.read()) != grpc.aio.EOF:
                assert isinstance(progress, rec.FitProgress)
                if progress.done:
                    await self._router.refresh()
                yield progress
            await sender  # the caller's stream failed: its error, not a truncated Fit
        except grpc.aio.AioRpcError as error:
            raise self._relayed(error) from None
        except asyncio.CancelledError:
            # The sender cancels the worker call when the caller's stream fails (an undecodable
            # message, say); reading the cancelled call then raises this: answer with the sender's error.
            failure = sender.exception() if sender.done() and not sender.cancelled() else None
            if failure is None or _being_cancelled():
                raise
            raise failure from None
        finally:
            call.cancel()
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)


async def _send(requests: AsyncIterator[rec.FitRequest], call: grpc.aio.StreamStreamCall) -> None:
    """Write the caller's FitRequests to the worker's call; a failed caller stream cancels the call."""
    try:
        async for request in requests:
            await call.write(request)
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return  # the worker ended the call; reading it gives its status
    except BaseException:
        call.cancel()
        raise


def _being_cancelled() -> bool:
    """The current task itself is being cancelled (its caller went away), as opposed to an awaited
    call having been cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
