"""What calls return: plain dataclasses with numpy arrays, parsed from the gateway's responses (one parser
per response type, shared by the sync and the asyncio client)."""

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb


def kind_name(kind: int) -> str:
    """`INPUT_KIND_IMAGE` -> "image"; "" for unspecified."""
    return (
        ""
        if kind == pb.INPUT_KIND_UNSPECIFIED
        else pb.InputKind.Name(kind).removeprefix("INPUT_KIND_").lower()
    )


def decode_vector(vector: pb.Vector) -> np.ndarray:
    """A wire vector as float32 values (INT8 scaled back, BINARY as +1/-1 per dimension)."""
    if vector.dtype == pb.DTYPE_FLOAT16:
        return np.frombuffer(vector.data, dtype="<f2").astype(np.float32)
    if vector.dtype == pb.DTYPE_INT8:
        return np.frombuffer(vector.data, dtype=np.int8).astype(np.float32) * np.float32(vector.scale)
    if vector.dtype == pb.DTYPE_BINARY:
        bits = np.unpackbits(np.frombuffer(vector.data, dtype=np.uint8))[: vector.dim]
        return bits.astype(np.float32) * 2.0 - 1.0
    return np.frombuffer(vector.data, dtype="<f4").copy()


@dataclass(frozen=True)
class Model:
    """The model (and its version: a hash of its weights) that produced a result, and its space."""

    id: str
    version: str
    space: str

    @classmethod
    def parse(cls, ref: pb.ModelRef) -> "Model":
        return cls(ref.id, ref.version, ref.space)


@dataclass(frozen=True)
class Embeddings:
    """One vector per input, in input order: `vectors` is (inputs, dimension) float32."""

    vectors: np.ndarray
    model: Model
    truncated: tuple[bool, ...]
    input_tokens: tuple[int, ...]
    cached: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.vectors)

    @classmethod
    def parse(cls, response: enc.EncodeResponse) -> "Embeddings":
        rows = [decode_vector(embedding.vector) for embedding in response.embeddings]
        return cls(
            vectors=np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32),
            model=Model.parse(response.model),
            truncated=tuple(e.truncated for e in response.embeddings),
            input_tokens=tuple(e.input_tokens for e in response.embeddings),
            cached=tuple(e.cached for e in response.embeddings),
        )


@dataclass(frozen=True)
class Similarity:
    """Cosine similarities: `scores` is (queries, candidates) for a matrix, (pairs,) for pairwise."""

    scores: np.ndarray
    space: str
    query_model: Model
    candidate_model: Model

    @classmethod
    def parse(cls, response: gw.SimilarityResponse, pairwise: bool) -> "Similarity":
        scores = np.asarray(response.scores, dtype=np.float32)
        return cls(
            scores=scores if pairwise else scores.reshape(response.rows, response.cols),
            space=response.space,
            query_model=Model.parse(response.query_model),
            candidate_model=Model.parse(response.candidate_model),
        )


@dataclass(frozen=True)
class HitSource:
    """One ranked list a fused or hybrid hit was found in: the space searched and the model of the query
    there (a user part: the user-item model), the hit's rank in it (from 1) and its score there."""

    model: Model
    rank: int
    score: float

    @classmethod
    def parse(cls, source: pb.HitSource) -> "HitSource":
        return cls(Model.parse(source.model), source.rank, source.score)


@dataclass(frozen=True)
class Hit:
    """An indexed item (or, for recommendations, an item id) and its score; `payload` is the JSON object
    stored with it (None when there is none). `sources`: for fused and hybrid searches, each ranked list it
    was found in (`score` is then the fused score)."""

    id: str
    score: float
    kind: str
    payload: dict[str, Any] | None
    shard: str
    sources: tuple[HitSource, ...] = ()

    @classmethod
    def parse(cls, hit: pb.Hit) -> "Hit":
        return cls(
            hit.id,
            hit.score,
            kind_name(hit.kind),
            json.loads(hit.payload_json) if hit.payload_json else None,
            hit.shard,
            tuple(HitSource.parse(source) for source in hit.sources),
        )


@dataclass(frozen=True)
class SpaceSearched:
    """One ranked list of a fused or hybrid search: its model (and space), how many hits it gave, its
    shards that did not answer, why it could not be searched (`error`, empty if it was), and whether
    nothing was ever stored in it (`empty`)."""

    model: Model
    hits: int
    missing_shards: tuple[str, ...]
    error: str
    empty: bool

    @classmethod
    def parse(cls, searched: gw.SpaceSearched) -> "SpaceSearched":
        return cls(
            Model.parse(searched.model),
            searched.hits,
            tuple(searched.missing_shards),
            searched.error,
            searched.empty,
        )


@dataclass(frozen=True)
class SearchResult:
    """The best hits first. `partial`: some shards (`missing_shards`) or, for fused searches, whole spaces
    (`missing_spaces`) did not answer. `spaces`: for fused and hybrid searches, each list that was fused."""

    hits: list[Hit]
    space: str
    partial: bool
    missing_shards: tuple[str, ...]
    query_model: Model
    spaces: tuple[SpaceSearched, ...] = ()
    missing_spaces: tuple[str, ...] = ()

    @classmethod
    def parse(cls, response: gw.SearchResponse) -> "SearchResult":
        return cls(
            [Hit.parse(hit) for hit in response.hits],
            response.space,
            response.partial,
            tuple(response.missing_shards),
            Model.parse(response.query_model),
            tuple(SpaceSearched.parse(searched) for searched in response.spaces),
            tuple(response.missing_spaces),
        )


@dataclass(frozen=True)
class Recommendations:
    """Item ids, best first; `Hit.score` is the model's score (an explicit MF model's predicted rating,
    within its rating scale). `fallback`: the most popular items were returned instead (the request's
    `fallback_below`), scored by their interaction counts."""

    items: list[Hit]
    model: Model
    fallback: bool = False

    @classmethod
    def parse(cls, response: rec.RecommendResponse) -> "Recommendations":
        return cls([Hit.parse(hit) for hit in response.items], Model.parse(response.model), response.fallback)


@dataclass(frozen=True)
class Scores:
    """The score of each item asked for, in the order asked: what Recommend would score it."""

    items: list[Hit]
    model: Model

    @classmethod
    def parse(cls, response: rec.ScoreResponse) -> "Scores":
        return cls([Hit.parse(hit) for hit in response.items], Model.parse(response.model))


@dataclass(frozen=True)
class FoldIn:
    """A vector for a user the model was not trained on (float32, not normalised, comparable with the
    model's item vectors), and, when asked for (k > 0), the items recommended to that user, best first."""

    vector: np.ndarray
    model: Model
    items: list[Hit]

    @classmethod
    def parse(cls, response: rec.FoldInResponse) -> "FoldIn":
        return cls(
            decode_vector(response.vector),
            Model.parse(response.model),
            [Hit.parse(hit) for hit in response.items],
        )


@dataclass(frozen=True)
class UpsertAck:
    """The gateway acknowledged (stored durably) the items `ids` of one request of a bulk upsert."""

    request_id: str
    upserted: int
    ids: tuple[str, ...]


@dataclass(frozen=True)
class Deleted:
    deleted: int
    not_found: int

    @classmethod
    def parse(cls, response: gw.DeleteResponse) -> "Deleted":
        return cls(response.deleted, response.not_found)


@dataclass(frozen=True)
class Dropped:
    """A dropped space: the items removed, and the shards that did not answer (the space is gone for every
    call all the same; they remove their copy when the space is next written to)."""

    dropped: int
    missing_shards: list[str]

    @classmethod
    def parse(cls, response: gw.DropSpaceResponse) -> "Dropped":
        return cls(response.dropped, list(response.missing_shards))


@dataclass(frozen=True)
class ContentMap:
    """What a Fit with item content learnt: a map from content vectors of `space` (`dimension`-d) to item
    vectors, from `items` items, its penalty `l2` and its leave-one-out R^2."""

    space: str
    dimension: int
    items: int
    l2: float
    r2: float


@dataclass(frozen=True)
class FitProgress:
    """One epoch of a Fit; the last one (`done`) names the new version and what it learnt from."""

    epoch: int
    epochs: int
    train_loss: float
    validation_rmse: float
    done: bool
    model: Model | None
    interactions: int
    users: int
    items: int
    validation_recall_at_10: float
    validation_ndcg_at_10: float
    kind: str  # "ease" or "mf"
    content_map: ContentMap | None = None  # the last message of a Fit with item content

    @classmethod
    def parse(cls, progress: rec.FitProgress) -> "FitProgress":
        learnt = progress.content_map if progress.HasField("content_map") else None
        return cls(
            epoch=progress.epoch,
            epochs=progress.epochs,
            train_loss=progress.train_loss,
            validation_rmse=progress.validation_rmse,
            done=progress.done,
            model=Model.parse(progress.model) if progress.HasField("model") else None,
            interactions=progress.interactions,
            users=progress.users,
            items=progress.items,
            validation_recall_at_10=progress.validation_recall_at_10,
            validation_ndcg_at_10=progress.validation_ndcg_at_10,
            kind=rec.ModelKind.Name(progress.kind).removeprefix("MODEL_KIND_").lower(),
            content_map=ContentMap(learnt.space, learnt.dimension, learnt.items, learnt.l2, learnt.r2)
            if learnt is not None
            else None,
        )


@dataclass(frozen=True)
class ModelInfo:
    """A model behind the gateway."""

    id: str
    version: str
    dimension: int
    space: str
    input_kinds: tuple[str, ...]
    max_input_tokens: int
    description: str

    @classmethod
    def parse(cls, info: pb.ModelInfo) -> "ModelInfo":
        return cls(
            info.id,
            info.version,
            info.dimension,
            info.space,
            tuple(kind_name(kind) for kind in info.input_kinds),
            info.max_input_tokens,
            info.description,
        )


def model_list(response: enc.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo.parse(info) for info in response.models]
