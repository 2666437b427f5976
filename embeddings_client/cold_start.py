"""Cold-start items: item content for a Fit (which learns a content map from it) and for FoldInItems (new
items recommendable at once from their content alone)."""

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TypeAlias, cast

import numpy as np
from embeddings.v1 import content_pb2 as cpb
from embeddings.v1 import recommender_pb2 as rec

from embeddings_client.messages import Query, query_input, to_wire
from embeddings_client.results import Model, decode_vector

Content: TypeAlias = Query | Sequence[Query] | np.ndarray
"""An item's content: a text (`str`), an image (bytes, a `pathlib.Path` or a PIL image), a list of texts
and images (their vectors are averaged), or a numpy vector already in the content space."""

CONTENT_PER_MESSAGE = 500  # items of content per Fit message: each message is encoded before the next is read


@dataclass(frozen=True)
class FoldedItems:
    """New items' vectors (one row per item asked for, in its order; float32, not normalised) in the model
    version that now holds them, and how many of the items were new to it."""

    model: Model
    vectors: np.ndarray
    added: int

    @classmethod
    def parse(cls, response: cpb.FoldInItemsResponse) -> "FoldedItems":
        rows = [decode_vector(vector) for vector in response.vectors]
        vectors = np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)
        return cls(Model.parse(response.model), vectors, response.added)


def item_content(item_id: str, content: Content) -> cpb.ItemContent:
    if isinstance(content, np.ndarray):
        return cpb.ItemContent(item_id=item_id, vector=to_wire(content))
    parts = list(content) if isinstance(content, list | tuple) else [cast(Query, content)]
    return cpb.ItemContent(item_id=item_id, inputs=[query_input(part) for part in parts])


def fold_in_items(items: Mapping[str, Content], model: str, content_space: str) -> cpb.FoldInItemsRequest:
    return cpb.FoldInItemsRequest(
        items=[item_content(item, content) for item, content in items.items()],
        model=model,
        content_space=content_space,
    )


def with_content(
    requests: Iterable[rec.FitRequest], contents: Mapping[str, Content] | None, content_space: str
) -> Iterator[rec.FitRequest]:
    """A Fit's messages, then its item content in messages of their own (the space named on the first)."""
    first = True
    for request in requests:
        if first and content_space:
            request.content_space = content_space
        first = False
        yield request
    pairs = iter((contents or {}).items())
    while chunk := list(islice(pairs, CONTENT_PER_MESSAGE)):
        yield rec.FitRequest(item_content=[item_content(item, content) for item, content in chunk])
