"""Every call as data: the method's path, the request built from Python values and the parser of its
responses. The sync and the asyncio client take these plans and only invoke (or await) them, so the two
flavours cannot drift apart."""

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from embeddings.v1 import content_pb2 as cpb
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import recommender_pb2 as rec
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from embeddings_client import cold_start, messages
from embeddings_client.cold_start import Content, FoldedItems
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
    model_list,
)

Out = TypeVar("Out")

GATEWAY = "/embeddings.v1.Gateway/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@dataclass(frozen=True)
class Unary(Generic[Out]):
    """One request, one response. Every unary call of the gateway is idempotent (upserts replace by id),
    so each may be retried on UNAVAILABLE."""

    method: str
    request: Message
    response_type: type[Message]
    parse: Callable[[Any], Out]


@dataclass(frozen=True)
class Streaming(Generic[Out]):
    """A stream of requests answered by a stream of responses; never retried: requests already consumed
    cannot be sent again, and a Fit must not run twice."""

    method: str
    requests: Iterable[Message]
    response_type: type[Message]
    parse: Callable[[Any], Out]


def serialize(message: Message) -> bytes:
    return message.SerializeToString()


def encode_text(
    texts: str | Sequence[str], model: str, dimensions: int, normalize: bool, dtype: str, strict: bool
) -> Unary[Embeddings]:
    options = messages.encode_options(dimensions, normalize, dtype, strict)
    request = messages.encode_texts(texts, model, options)
    return Unary(GATEWAY + "Encode", request, enc.EncodeResponse, Embeddings.parse)


def encode_image(
    images: ImageSource | Sequence[ImageSource], model: str, dimensions: int, normalize: bool, dtype: str
) -> Unary[Embeddings]:
    options = messages.encode_options(dimensions, normalize, dtype)
    request = messages.encode_images(images, model, options)
    return Unary(GATEWAY + "Encode", request, enc.EncodeResponse, Embeddings.parse)


def encode_ids(
    ids: str | Sequence[str], kind: str, model: str, dimensions: int, normalize: bool, dtype: str
) -> Unary[Embeddings]:
    options = messages.encode_options(dimensions, normalize, dtype)
    request = messages.encode_ids(ids, kind, model, options)
    return Unary(GATEWAY + "Encode", request, enc.EncodeResponse, Embeddings.parse)


def encode_stream(
    batches: Iterable[Sequence[Query]],
    model: str,
    dimensions: int,
    normalize: bool,
    dtype: str,
    strict: bool,
) -> Streaming[Embeddings]:
    options = messages.encode_options(dimensions, normalize, dtype, strict)
    requests = messages.encode_stream(batches, model, options)
    return Streaming(GATEWAY + "EncodeStream", requests, enc.EncodeResponse, Embeddings.parse)


def similarity(
    queries: Sequence[Query],
    candidates: Sequence[Query],
    pairwise: bool,
    query_model: str,
    candidate_model: str,
    space: str,
) -> Unary[Similarity]:
    request = messages.similarity(queries, candidates, pairwise, query_model, candidate_model, space)
    return Unary(
        GATEWAY + "Similarity",
        request,
        gw.SimilarityResponse,
        lambda response: Similarity.parse(response, pairwise),
    )


def search(
    query: Query | np.ndarray,
    space: str,
    model: str,
    k: int,
    kinds: Sequence[str],
    where: Mapping[str, str] | None,
    all_spaces: bool = False,
) -> Unary[SearchResult]:
    request = messages.search(query, space, model, k, kinds, where, all_spaces)
    return Unary(GATEWAY + "Search", request, gw.SearchResponse, SearchResult.parse)


def hybrid_search(
    query: Query,
    user_id: str,
    weight: float | None,
    mix: str,
    k: int,
    space: str,
    model: str,
    useritem_model: str,
    candidates: int,
    kinds: Sequence[str],
    where: Mapping[str, str] | None,
) -> Unary[SearchResult]:
    request = messages.hybrid_search(
        query, user_id, weight, mix, k, space, model, useritem_model, candidates, kinds, where
    )
    return Unary(GATEWAY + "HybridSearch", request, gw.SearchResponse, SearchResult.parse)


def upsert(items: Iterable[Item], space: str, model: str) -> Unary[int]:
    request = messages.upsert(items, space, model)
    return Unary(GATEWAY + "Upsert", request, gw.UpsertResponse, lambda response: int(response.upserted))


def upsert_stream(batches: Iterable[Sequence[Item]], space: str, model: str) -> Streaming[UpsertAck]:
    pending: dict[str, tuple[str, ...]] = {}

    def acknowledged(response: gw.UpsertResponse) -> UpsertAck:
        return UpsertAck(response.request_id, response.upserted, pending.pop(response.request_id))

    requests = messages.upsert_stream(batches, space, model, pending)
    return Streaming(GATEWAY + "UpsertStream", requests, gw.UpsertResponse, acknowledged)


def delete(ids: Iterable[str], space: str) -> Unary[Deleted]:
    request = gw.DeleteRequest(space=space, ids=list(ids))
    return Unary(GATEWAY + "Delete", request, gw.DeleteResponse, Deleted.parse)


def drop_space(space: str) -> Unary[Dropped]:
    return Unary(GATEWAY + "DropSpace", gw.DropSpaceRequest(space=space), gw.DropSpaceResponse, Dropped.parse)


def recommend(
    user_id: str,
    k: int,
    model: str,
    include_seen: bool,
    exclude_items: Iterable[str] = (),
    candidate_items: Iterable[str] = (),
    fallback_below: int = 0,
) -> Unary[Recommendations]:
    request = messages.recommend(
        user_id, k, model, include_seen, exclude_items, candidate_items, fallback_below
    )
    return Unary(GATEWAY + "Recommend", request, rec.RecommendResponse, Recommendations.parse)


def score(user_id: str, item_ids: Iterable[str], model: str) -> Unary[Scores]:
    request = rec.ScoreRequest(user_id=user_id, item_ids=list(item_ids), model=model)
    return Unary(GATEWAY + "Score", request, rec.ScoreResponse, Scores.parse)


def similar_items(item_id: str, k: int, model: str) -> Unary[Recommendations]:
    request = rec.SimilarItemsRequest(item_id=item_id, k=k, model=model)
    return Unary(GATEWAY + "SimilarItems", request, rec.RecommendResponse, Recommendations.parse)


def fold_in(ratings: Rated, k: int, model: str, include_seen: bool) -> Unary[FoldIn]:
    request = messages.fold_in(ratings, model, k, include_seen)
    return Unary(GATEWAY + "FoldIn", request, rec.FoldInResponse, FoldIn.parse)


def fold_in_items(items: Mapping[str, Content], model: str, content_space: str) -> Unary[FoldedItems]:
    request = cold_start.fold_in_items(items, model, content_space)
    return Unary(GATEWAY + "FoldInItems", request, cpb.FoldInItemsResponse, FoldedItems.parse)


def fit(
    interactions: Iterable[Interaction],
    model: str,
    implicit: bool,
    rating_range: tuple[float, float] | None,
    chunk_size: int,
    kind: str = "",
    parameters: Mapping[str, float] | None = None,
    item_content: Mapping[str, Content] | None = None,
    content_space: str = "",
) -> Streaming[FitProgress]:
    requests = cold_start.with_content(
        messages.fit(interactions, model, implicit, rating_range, chunk_size, kind, parameters),
        item_content,
        content_space,
    )
    return Streaming(GATEWAY + "Fit", requests, rec.FitProgress, FitProgress.parse)


def list_models() -> Unary[list[ModelInfo]]:
    return Unary(GATEWAY + "ListModels", enc.ListModelsRequest(), enc.ListModelsResponse, model_list)


def health(service: str) -> Unary[str]:
    """grpc.health.v1 Check of `service` ("": the whole server): "SERVING", "NOT_SERVING", ..."""
    return Unary(
        HEALTH_CHECK,
        health_pb2.HealthCheckRequest(service=service),
        health_pb2.HealthCheckResponse,
        lambda response: str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)),
    )
