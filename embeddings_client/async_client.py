"""The asyncio client (grpc.aio): the same calls as `Client`, awaited."""

from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Unpack

import grpc
import numpy as np

from embeddings_client import calls
from embeddings_client.calls import Out, Streaming, Unary
from embeddings_client.cold_start import Content, FoldedItems
from embeddings_client.connection import DEFAULT_ADDRESS, Connection, ConnectionOptions
from embeddings_client.errors import from_rpc_error
from embeddings_client.messages import ImageSource, Interaction, Item, Query, Rated
from embeddings_client.results import (
    Deleted,
    Dropped,
    Embeddings,
    FitProgress,
    FoldIn,
    ModelInfo,
    Recommendations,
    Scores,
    SearchResult,
    Similarity,
    UpsertAck,
)
from embeddings_client.retry import acall_with_retry


class AsyncClient:
    """Calls the gateway at `address` from asyncio code; create it inside the running event loop (its
    channel belongs to that loop) and close it with `await client.close()` or `async with`.

    Failed calls raise `EmbeddingsError` subclasses (`InvalidArgument`, `NotFound`, ...). Each unary call
    has a deadline (`timeout_s`, default the connection's) that covers its retries on UNAVAILABLE; the
    streaming calls (`encode_stream`, `upsert_stream`, `fit`) have `stream_timeout_s` and are never
    retried.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, **options: Unpack[ConnectionOptions]) -> None:
        self.connection = Connection(address, **options)
        self._channel = self.connection.aio_channel()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, call: Unary[Out], timeout_s: float | None) -> Out:
        method = self._channel.unary_unary(
            call.method,
            request_serializer=calls.serialize,
            response_deserializer=call.response_type.FromString,
        )

        async def invoke(remaining_s: float) -> Any:
            return await method(call.request, timeout=remaining_s, metadata=self.connection.metadata())

        response = await acall_with_retry(
            invoke, self.connection.retry, timeout_s or self.connection.timeout_s
        )
        return call.parse(response)

    def _stream(self, call: Streaming[Out], timeout_s: float | None) -> AsyncIterator[Out]:
        method = self._channel.stream_stream(
            call.method,
            request_serializer=calls.serialize,
            response_deserializer=call.response_type.FromString,
        )
        responses = method(
            call.requests,
            timeout=timeout_s or self.connection.stream_timeout_s,
            metadata=self.connection.metadata(),
        )
        return _parsed(responses, call.parse)

    async def encode_text(
        self,
        texts: str | Sequence[str],
        *,
        model: str = "",
        dimensions: int = 0,
        normalize: bool = True,
        dtype: str = "float32",
        strict: bool = False,
        timeout_s: float | None = None,
    ) -> Embeddings:
        """Vectors of one text or several (model "": the gateway's default text model)."""
        return await self._unary(
            calls.encode_text(texts, model, dimensions, normalize, dtype, strict), timeout_s
        )

    async def encode_image(
        self,
        images: ImageSource | Sequence[ImageSource],
        *,
        model: str = "",
        dimensions: int = 0,
        normalize: bool = True,
        dtype: str = "float32",
        timeout_s: float | None = None,
    ) -> Embeddings:
        """Vectors of one image or several: file bytes, paths or PIL images."""
        return await self._unary(calls.encode_image(images, model, dimensions, normalize, dtype), timeout_s)

    async def encode_users(
        self,
        user_ids: str | Sequence[str],
        *,
        model: str = "",
        dimensions: int = 0,
        normalize: bool = True,
        dtype: str = "float32",
        timeout_s: float | None = None,
    ) -> Embeddings:
        """The learnt vectors of users of a user-item model (model "": the gateway's default one)."""
        return await self._unary(
            calls.encode_ids(user_ids, "user", model, dimensions, normalize, dtype), timeout_s
        )

    async def encode_items(
        self,
        item_ids: str | Sequence[str],
        *,
        model: str = "",
        dimensions: int = 0,
        normalize: bool = True,
        dtype: str = "float32",
        timeout_s: float | None = None,
    ) -> Embeddings:
        """The learnt vectors of items of a user-item model (model "": the gateway's default one)."""
        return await self._unary(
            calls.encode_ids(item_ids, "item", model, dimensions, normalize, dtype), timeout_s
        )

    def encode_stream(
        self,
        batches: Iterable[Sequence[Query]],
        *,
        model: str = "",
        dimensions: int = 0,
        normalize: bool = True,
        dtype: str = "float32",
        strict: bool = False,
        timeout_s: float | None = None,
    ) -> AsyncIterator[Embeddings]:
        """Bulk encoding through one stream: one request per batch (texts, or images), one `Embeddings`
        per batch, in order. The next batches are sent while earlier ones are encoded. Not retried: a
        stream cut short is resumed by sending the batches not yet answered."""
        return self._stream(
            calls.encode_stream(batches, model, dimensions, normalize, dtype, strict), timeout_s
        )

    async def similarity(
        self,
        queries: Sequence[Query],
        candidates: Sequence[Query],
        *,
        pairwise: bool = False,
        query_model: str = "",
        candidate_model: str = "",
        space: str = "",
        timeout_s: float | None = None,
    ) -> Similarity:
        """Cosine similarities of queries and candidates (str: a text; bytes, Path, PIL image: an image)."""
        call = calls.similarity(queries, candidates, pairwise, query_model, candidate_model, space)
        return await self._unary(call, timeout_s)

    async def search(
        self,
        query: Query | np.ndarray,
        *,
        k: int = 10,
        space: str = "",
        model: str = "",
        kinds: Sequence[str] = (),
        where: Mapping[str, str] | None = None,
        all_spaces: bool = False,
        timeout_s: float | None = None,
    ) -> SearchResult:
        """The k nearest indexed items to a text, an image or a vector (which needs `space`); `kinds` keeps
        items of those kinds ("text", "image"), `where` items whose payload has those string values.
        `all_spaces`: search every space where the query's kind has a model and fuse the lists by
        reciprocal rank (each hit's `sources` name its spaces; `space` and `model` stay empty)."""
        return await self._unary(calls.search(query, space, model, k, kinds, where, all_spaces), timeout_s)

    async def hybrid_search(
        self,
        query: Query,
        user_id: str,
        *,
        k: int = 10,
        weight: float | None = None,
        mix: str = "rrf",
        space: str = "",
        model: str = "",
        useritem_model: str = "",
        candidates: int = 0,
        kinds: Sequence[str] = (),
        where: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> SearchResult:
        """Items of a content space near a text or an image, mixed with what `user_id` likes (a user-item
        model's vectors of the items with the same ids): `weight` of the user's part in [0, 1] (None: the
        gateway's 0.5), `mix` "rrf" (weighted reciprocal rank fusion) or "weighted" (weighted sum of
        min-max normalised scores), over the query's `candidates` nearest items (0: the gateway's default)."""
        call = calls.hybrid_search(
            query, user_id, weight, mix, k, space, model, useritem_model, candidates, kinds, where
        )
        return await self._unary(call, timeout_s)

    async def upsert(
        self, items: Iterable[Item], *, space: str = "", model: str = "", timeout_s: float | None = None
    ) -> int:
        """Index (or replace, by id) up to 256 items; the number upserted."""
        return await self._unary(calls.upsert(items, space, model), timeout_s)

    def upsert_stream(
        self,
        batches: Iterable[Sequence[Item]],
        *,
        space: str = "",
        model: str = "",
        timeout_s: float | None = None,
    ) -> AsyncIterator[UpsertAck]:
        """Bulk indexing: one request per batch, one acknowledgement (with the batch's ids) per request,
        in order, once the items are durable. Not retried: resend the unacknowledged batches instead
        (upserts replace by id, so resending is safe)."""
        return self._stream(calls.upsert_stream(batches, space, model), timeout_s)

    async def delete(self, ids: Iterable[str], *, space: str, timeout_s: float | None = None) -> Deleted:
        """Remove items from `space` by id; unknown ids are counted, not an error."""
        return await self._unary(calls.delete(ids, space), timeout_s)

    async def drop_space(self, space: str, *, timeout_s: float | None = None) -> Dropped:
        """Remove `space` and every item in it (its name, and a new dimension, may then be used again)."""
        return await self._unary(calls.drop_space(space), timeout_s)

    async def recommend(
        self,
        user_id: str,
        *,
        k: int = 10,
        model: str = "",
        include_seen: bool = False,
        exclude_items: Iterable[str] = (),
        candidate_items: Iterable[str] = (),
        fallback_below: int = 0,
        timeout_s: float | None = None,
    ) -> Recommendations:
        """The k best items for a known user, best first: never the `exclude_items`, only among the
        `candidate_items` when given. `fallback_below` > 0: a user with fewer interactions than that (an
        unknown one has none) gets the most popular items instead, with `fallback` set."""
        return await self._unary(
            calls.recommend(user_id, k, model, include_seen, exclude_items, candidate_items, fallback_below),
            timeout_s,
        )

    async def score(
        self, user_id: str, item_ids: Iterable[str], *, model: str = "", timeout_s: float | None = None
    ) -> Scores:
        """The model's score of each item for a known user, in the order given (what Recommend would
        score it: an explicit MF model's predicted rating, within its scale)."""
        return await self._unary(calls.score(user_id, item_ids, model), timeout_s)

    async def similar_items(
        self, item_id: str, *, k: int = 10, model: str = "", timeout_s: float | None = None
    ) -> Recommendations:
        """The k items closest to a known item (cosine of the learnt item vectors), best first."""
        return await self._unary(calls.similar_items(item_id, k, model), timeout_s)

    async def fold_in(
        self,
        ratings: Rated,
        *,
        k: int = 10,
        model: str = "",
        include_seen: bool = False,
        timeout_s: float | None = None,
    ) -> FoldIn:
        """A vector, and k recommendations (k=0: none), for a user the model has not seen, from their
        ratings of known items ({item id: rating} or (item id, rating) pairs), without retraining."""
        return await self._unary(calls.fold_in(ratings, k, model, include_seen), timeout_s)

    def fit(
        self,
        interactions: Iterable[Interaction],
        *,
        model: str = "",
        implicit: bool = False,
        rating_range: tuple[float, float] | None = None,
        chunk_size: int = 5000,
        kind: str = "",
        parameters: Mapping[str, float] | None = None,
        item_content: Mapping[str, Content] | None = None,
        content_space: str = "",
        timeout_s: float | None = None,
    ) -> AsyncIterator[FitProgress]:
        """Train a new version of a user-item model; progress per epoch, the last one `done`. `kind`:
        "ease" (ranks best), "mf" (predicts ratings) or "" (the worker's default); `parameters`: per-Fit
        hyper-parameters by FitParameters' field names (l2, factors, epochs, ...). `item_content`:
        {item id: its text, image(s) or content vector}, from which a Fit of kind "mf" also learns a
        content map (for `fold_in_items`), encoded in `content_space` (default: the text model's). Never
        retried (a Fit is not idempotent)."""
        return self._stream(
            calls.fit(
                interactions,
                model,
                implicit,
                rating_range,
                chunk_size,
                kind,
                parameters,
                item_content,
                content_space,
            ),
            timeout_s,
        )

    async def fold_in_items(
        self,
        items: Mapping[str, Content],
        *,
        model: str = "",
        content_space: str = "",
        timeout_s: float | None = None,
    ) -> FoldedItems:
        """New items, recommendable at once from their content alone ({item id: its text, image(s) or
        content vector}), through the content map the model's last Fit learnt: their vectors, in the new
        model version that holds them. The next Fit replaces them with learnt vectors."""
        return await self._unary(calls.fold_in_items(items, model, content_space), timeout_s)

    async def list_models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        return await self._unary(calls.list_models(), timeout_s)

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The grpc.health.v1 status: "SERVING" once the gateway can serve."""
        return await self._unary(calls.health(service), timeout_s)


async def _parsed(responses: Any, parse: Callable[[Any], Out]) -> AsyncIterator[Out]:
    """Parsed responses of a streaming call; its gRPC error typed; the call cancelled if left early."""
    try:
        async for response in responses:
            yield parse(response)
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None
    finally:
        responses.cancel()
