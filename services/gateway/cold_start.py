"""Cold-start items through the gateway: item content (text and/or images) encoded into one content space,
through the vector cache, and handed to the user-item worker as vectors, in a Fit's stream (where the
worker learns its content map) and in FoldInItems (where new items get vectors from it).

The content space: the one the request names (FitRequest.content_space, FoldInItemsRequest.content_space),
else the space of the default model of the first content input's kind (the default text model's, for
text). Each input is encoded by the default model of its kind in that space; an item's content vector is
the mean of its inputs' L2-normalised vectors (text and a photo of one item, in a space that has both,
such as CLIP's, count alike).
"""

from collections.abc import AsyncIterator, Sequence

import numpy as np
from embeddings.v1 import content_pb2 as cpb
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument
from services.common.inputs import KIND_OF_FIELD
from services.common.vectors import l2_normalize, to_wire
from services.gateway.choosing import ModelChooser
from services.gateway.encoding import CachingEncoder
from services.gateway.recommending import Recommendations
from services.gateway.routing import Router

CONTENT_KINDS = (pb.INPUT_KIND_TEXT, pb.INPUT_KIND_IMAGE)


class ContentEncoder:
    """Item content to content vectors in one space."""

    def __init__(self, models: ModelChooser, encoder: CachingEncoder, batch: int) -> None:
        self._models = models
        self._encoder = encoder
        self._batch = batch  # inputs per call to a worker (GATEWAY_MAX_INPUTS_PER_REQUEST)

    def space(self, named: str, contents: Sequence[cpb.ItemContent], field: str) -> str:
        """The content space: `named`, else the default model's of the first input's kind."""
        if named:
            return named
        for index, content in enumerate(contents):
            for position, item in enumerate(content.inputs):
                kind = _content_kind(item, f"{field}[{index}].inputs[{position}]")
                return self._models.default_card(kind).space
        raise InvalidArgument(
            "is empty, and the content is given as vectors: name the space they are in", field="content_space"
        )

    async def vectors(
        self, contents: Sequence[cpb.ItemContent], space: str, timeout: float, field: str, offset: int = 0
    ) -> list[cpb.ItemContent]:
        """`contents` with every item's inputs replaced by its content vector (vectors given pass as they
        are, for the worker to check); errors name `field[offset + i]`."""
        by_kind: dict[int, list[tuple[int, pb.Input]]] = {}
        for index, content in enumerate(contents):
            where = f"{field}[{offset + index}]"
            if content.inputs and content.HasField("vector"):
                raise InvalidArgument("has both inputs and a vector: give one or the other", field=where)
            for position, item in enumerate(content.inputs):
                kind = _content_kind(item, f"{where}.inputs[{position}]")
                by_kind.setdefault(kind, []).append((index, item))
        sums: dict[int, np.ndarray] = {}
        counts: dict[int, int] = {}
        for kind, entries in by_kind.items():
            card = self._models.default_card(kind, space)
            for start in range(0, len(entries), self._batch):
                chunk = entries[start : start + self._batch]
                encoded = await self._encoder.encode(
                    card,
                    [item for _, item in chunk],
                    False,
                    timeout,
                    field,
                    [offset + index for index, _ in chunk],
                )
                for (index, _), row in zip(chunk, l2_normalize(encoded.matrix()), strict=True):
                    sums[index] = sums[index] + row if index in sums else row
                    counts[index] = counts.get(index, 0) + 1
        out = []
        for index, content in enumerate(contents):
            if index in sums:
                vector = to_wire((sums[index] / counts[index]).astype(np.float32))
                out.append(cpb.ItemContent(item_id=content.item_id, vector=vector))
            else:
                out.append(content)
        return out


def _content_kind(item: pb.Input, field: str) -> int:
    """TEXT or IMAGE; INVALID_ARGUMENT for an empty input or an id."""
    which = item.WhichOneof("content")
    kind = KIND_OF_FIELD.get(which or "")
    if kind not in CONTENT_KINDS:
        held = f"holds a {which}" if which else "is empty"
        raise InvalidArgument(f"{held}: item content is text or an image", field=field)
    return kind


class ColdStart:
    """FoldInItems and the content of a Fit's stream, encoded here and passed to the user-item worker."""

    def __init__(
        self, content: ContentEncoder, recommendations: Recommendations, router: Router, max_items: int
    ) -> None:
        self._content = content
        self._recommendations = recommendations
        self._router = router
        self._max_items = max_items

    async def fold_in_items(self, request: cpb.FoldInItemsRequest, timeout: float) -> cpb.FoldInItemsResponse:
        if not request.items or len(request.items) > self._max_items:
            raise InvalidArgument(
                f"takes 1 to {self._max_items} items (GATEWAY_MAX_INPUTS_PER_REQUEST); got {len(request.items)}",
                field="items",
            )
        space = self._content.space(request.content_space, request.items, "items")
        items = await self._content.vectors(request.items, space, timeout, "items")
        forwarded = cpb.FoldInItemsRequest(items=items, model=request.model, content_space=space)
        response = await self._recommendations.fold_in_items(forwarded, timeout)
        await self._router.refresh()  # Encode of the new items' ids: the new version at once
        return response

    async def fit_requests(
        self, requests: AsyncIterator[rec.FitRequest], timeout: float
    ) -> AsyncIterator[rec.FitRequest]:
        """The caller's Fit stream with its item content encoded; the space, once known, set on each
        message that has content."""
        space = ""
        offset = 0
        async for request in requests:
            if request.item_content:
                space = space or self._content.space(
                    request.content_space, request.item_content, "item_content"
                )
                if request.content_space and request.content_space != space:
                    raise InvalidArgument(
                        f"is {request.content_space!r}, but the Fit's content is in {space!r}; one Fit has "
                        "one content space",
                        field="content_space",
                    )
                items = await self._content.vectors(
                    request.item_content, space, timeout, "item_content", offset
                )
                offset += len(items)
                del request.item_content[:]
                request.item_content.extend(items)
                request.content_space = space
            elif request.content_space:
                space = space or request.content_space
            yield request
