"""Building requests from Python values: texts, images (bytes, a path or a PIL image), vectors, items to
index and interactions to learn from. Pillow is optional: PIL images are accepted where it is installed."""

import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb

try:
    from PIL.Image import Image as PILImage
except ImportError:  # no Pillow: then no object is a PIL image, and nothing else changes

    class PILImage:  # type: ignore[no-redef]
        """Stands in for PIL.Image.Image where Pillow is not installed."""


ImageSource: TypeAlias = bytes | bytearray | str | os.PathLike[str] | PILImage
"""The bytes of an image file, the path of one, or a PIL image (sent as PNG)."""

Query: TypeAlias = str | bytes | bytearray | os.PathLike[str] | PILImage
"""A `str` is a text; bytes, a `pathlib.Path` or a PIL image is an image."""

Interaction: TypeAlias = tuple[str, str, float] | tuple[str, str, float, int]
"""(user id, item id, rating) or (user id, item id, rating, timestamp in seconds since the epoch)."""

Rated: TypeAlias = Mapping[str, float] | Iterable[tuple[str, float]]
"""A new user's ratings of known items for FoldIn: {item id: rating} or (item id, rating) pairs (an
implicit model ignores the ratings)."""

DTYPES = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "int8": pb.DTYPE_INT8,
    "binary": pb.DTYPE_BINARY,
}
KINDS = {
    "text": pb.INPUT_KIND_TEXT,
    "image": pb.INPUT_KIND_IMAGE,
    "user": pb.INPUT_KIND_USER,
    "item": pb.INPUT_KIND_ITEM,
}


def image_bytes(image: ImageSource) -> bytes:
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, PILImage):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    return Path(image).read_bytes()


def image_input(image: ImageSource) -> pb.Input:
    return pb.Input(image=image_bytes(image))


def query_input(query: Query) -> pb.Input:
    return pb.Input(text=query) if isinstance(query, str) else image_input(query)


def to_wire(vector: np.ndarray | Sequence[float]) -> pb.Vector:
    """A float32 wire vector."""
    row = np.asarray(vector, dtype="<f4").reshape(-1)
    return pb.Vector(data=row.tobytes(), dim=int(row.shape[0]), dtype=pb.DTYPE_FLOAT32)


def _one_or_many(values: Any, single: type | tuple[type, ...]) -> list[Any]:
    return [values] if isinstance(values, single) else list(values)


def encode_options(
    dimensions: int = 0, normalize: bool = True, dtype: str = "float32", strict: bool = False
) -> pb.EncodeOptions:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return pb.EncodeOptions(normalize=normalize, dimensions=dimensions, dtype=DTYPES[dtype], strict=strict)


def encode_texts(texts: str | Sequence[str], model: str, options: pb.EncodeOptions) -> enc.EncodeRequest:
    inputs = [pb.Input(text=text) for text in _one_or_many(texts, str)]
    return enc.EncodeRequest(model=model, inputs=inputs, options=options)


def encode_ids(
    ids: str | Sequence[str], kind: str, model: str, options: pb.EncodeOptions
) -> enc.EncodeRequest:
    """The learnt vectors of user ids (`kind` "user") or item ids ("item") of a user-item model."""
    if kind not in ("user", "item"):
        raise ValueError(f"kind must be user or item, not {kind!r}")
    inputs = [pb.Input(**{f"{kind}_id": one}) for one in _one_or_many(ids, str)]
    return enc.EncodeRequest(model=model, inputs=inputs, options=options)


def encode_stream(
    batches: Iterable[Sequence[Query]], model: str, options: pb.EncodeOptions
) -> Iterator[enc.EncodeRequest]:
    """One request per batch (texts, or images: bytes, a path or a PIL image), numbered in order; an image
    is read only when its batch is sent."""
    for number, batch in enumerate(batches):
        inputs = [query_input(one) for one in batch]
        yield enc.EncodeRequest(model=model, inputs=inputs, options=options, request_id=str(number))


def encode_images(
    images: ImageSource | Sequence[ImageSource], model: str, options: pb.EncodeOptions
) -> enc.EncodeRequest:
    single = (bytes, bytearray, str, os.PathLike, PILImage)
    inputs = [image_input(image) for image in _one_or_many(images, single)]
    return enc.EncodeRequest(model=model, inputs=inputs, options=options)


def similarity(
    queries: Sequence[Query],
    candidates: Sequence[Query],
    pairwise: bool,
    query_model: str,
    candidate_model: str,
    space: str,
) -> gw.SimilarityRequest:
    return gw.SimilarityRequest(
        queries=[query_input(query) for query in queries],
        candidates=[query_input(candidate) for candidate in candidates],
        mode=gw.SIMILARITY_MODE_PAIRWISE if pairwise else gw.SIMILARITY_MODE_MATRIX,
        query_model=query_model,
        candidate_model=candidate_model,
        space=space,
    )


def search_filter(kinds: Sequence[str], where: Mapping[str, str] | None) -> pb.SearchFilter:
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}: use {', '.join(KINDS)}")
    return pb.SearchFilter(kinds=[KINDS[kind] for kind in kinds], payload_equals=dict(where or {}))


def search(
    query: Query | np.ndarray,
    space: str,
    model: str,
    k: int,
    kinds: Sequence[str],
    where: Mapping[str, str] | None,
    all_spaces: bool = False,
) -> gw.SearchRequest:
    request = gw.SearchRequest(
        space=space, model=model, k=k, filter=search_filter(kinds, where), all_spaces=all_spaces
    )
    if isinstance(query, np.ndarray):
        request.vector.CopyFrom(to_wire(query))
    else:
        request.input.CopyFrom(query_input(query))
    return request


MIXES = {"rrf": gw.HYBRID_MIX_RRF, "weighted": gw.HYBRID_MIX_WEIGHTED}


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
) -> gw.HybridSearchRequest:
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}: use {', '.join(MIXES)}")
    request = gw.HybridSearchRequest(
        input=query_input(query),
        space=space,
        model=model,
        user_id=user_id,
        useritem_model=useritem_model,
        k=k,
        filter=search_filter(kinds, where),
        mix=MIXES[mix],
        candidates=candidates,
    )
    if weight is not None:
        request.user_weight = weight
    return request


@dataclass(frozen=True)
class Item:
    """Something to index under `id`: exactly one of `text`, `image` (encoded by the gateway) or `vector`
    (taken as it is; needs a space), and optionally a JSON-object `payload` returned with hits."""

    id: str
    text: str | None = None
    image: ImageSource | None = None
    vector: np.ndarray | Sequence[float] | None = None
    payload: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        given = sum(content is not None for content in (self.text, self.image, self.vector))
        if given != 1:
            raise ValueError(f"item {self.id!r}: give exactly one of text, image or vector ({given} given)")

    def to_proto(self) -> gw.UpsertItem:
        item = gw.UpsertItem(id=self.id, payload_json=json.dumps(dict(self.payload)) if self.payload else "")
        if self.text is not None:
            item.input.text = self.text
        elif self.image is not None:
            item.input.image = image_bytes(self.image)
        else:
            assert self.vector is not None
            item.vector.CopyFrom(to_wire(self.vector))
        return item


def upsert(items: Iterable[Item], space: str, model: str, request_id: str = "") -> gw.UpsertRequest:
    return gw.UpsertRequest(
        space=space, model=model, items=[item.to_proto() for item in items], request_id=request_id
    )


def upsert_stream(
    batches: Iterable[Sequence[Item]], space: str, model: str, pending: dict[str, tuple[str, ...]]
) -> Iterator[gw.UpsertRequest]:
    """One request per batch, numbered; `pending` maps each request id sent to its item ids until the
    answer arrives (an image is read only when its batch is sent)."""
    for number, batch in enumerate(batches):
        request_id = str(number)
        pending[request_id] = tuple(item.id for item in batch)
        yield upsert(batch, space, model, request_id)


MODEL_KINDS = {"": rec.MODEL_KIND_UNSPECIFIED, "ease": rec.MODEL_KIND_EASE, "mf": rec.MODEL_KIND_MF}


def fit(
    interactions: Iterable[Interaction],
    model: str,
    implicit: bool,
    rating_range: tuple[float, float] | None,
    chunk_size: int,
    kind: str = "",
    parameters: Mapping[str, float] | None = None,
) -> Iterator[rec.FitRequest]:
    """Interactions in chunks of `chunk_size`; the first message also names the model, whether the fit is
    implicit, the rating scale, the kind ("ease", "mf"; "": the worker's default) and the
    hyper-parameters (names of FitParameters' fields)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind {kind!r} is not one of: ease, mf (or empty for the worker's default)")
    first = rec.FitRequest(model=model, implicit=implicit, kind=MODEL_KINDS[kind])
    for name, value in (parameters or {}).items():
        if name not in rec.FitParameters.DESCRIPTOR.fields_by_name:
            known = ", ".join(rec.FitParameters.DESCRIPTOR.fields_by_name)
            raise ValueError(f"{name!r} is not a Fit parameter; the parameters are: {known}")
        kept = int(value) if name in ("factors", "epochs", "patience", "seed") else float(value)
        setattr(first.parameters, name, kept)
    if rating_range is not None:  # both bounds, sent even when 0: no range is the worker's default
        first.rating_min, first.rating_max = rating_range
    return _chunks(first, interactions, chunk_size)


def _chunks(
    first: rec.FitRequest, interactions: Iterable[Interaction], chunk_size: int
) -> Iterator[rec.FitRequest]:
    chunk: list[rec.Interaction] = []
    sent = False
    for user, item, rating, *stamp in interactions:
        timestamp = stamp[0] if stamp else 0
        chunk.append(rec.Interaction(user_id=user, item_id=item, rating=rating, timestamp=timestamp))
        if len(chunk) == chunk_size:
            yield _with(first, chunk)
            first, chunk, sent = rec.FitRequest(), [], True
    if chunk or not sent:
        yield _with(first, chunk)


def recommend(
    user_id: str,
    k: int,
    model: str,
    include_seen: bool,
    exclude_items: Iterable[str] = (),
    candidate_items: Iterable[str] = (),
    fallback_below: int = 0,
) -> rec.RecommendRequest:
    return rec.RecommendRequest(
        user_id=user_id,
        k=k,
        model=model,
        include_seen=include_seen,
        exclude_items=list(exclude_items),
        candidate_items=list(candidate_items),
        fallback_below=fallback_below,
    )


def fold_in(ratings: Rated, model: str, k: int, include_seen: bool) -> rec.FoldInRequest:
    pairs = ratings.items() if isinstance(ratings, Mapping) else ratings
    interactions = [rec.Interaction(item_id=item, rating=float(rating)) for item, rating in pairs]
    return rec.FoldInRequest(interactions=interactions, model=model, k=k, include_seen=include_seen)


def _with(request: rec.FitRequest, chunk: list[rec.Interaction]) -> rec.FitRequest:
    request.interactions.extend(chunk)
    return request
