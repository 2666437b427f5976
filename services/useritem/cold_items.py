"""Cold-start items in the user-item worker: a Fit with item content learns a content map beside the
model (content_map.py); FoldInItems gives new items vectors from their content through it.

A fold-in makes a new version: the serving one plus the new items (item vector and bias mapped from
the content, no interactions), saved and promoted like a Fit's (its content hash is its version, so
the gateway's cache never mixes the two). An item folded in before is replaced; an item the model
learnt from interactions is refused. The next Fit replaces the whole version: items it has
interactions of get learnt vectors, the others are gone until they are folded in again.

Fold-ins run one at a time, and not while a Fit runs: the Fit's version, promoted after them, would not
hold their items (ABORTED says so; retry once it is done).
"""

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from embeddings.v1 import content_pb2 as cpb

from services.common.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument
from services.common.vectors import to_wire
from services.useritem.catalog import Catalog
from services.useritem.content_map import (
    MIN_ITEMS,
    ContentBuffer,
    ContentMap,
    content_vector,
    learn_content_map,
)
from services.useritem.model import MF, TrainedModel
from services.useritem.settings import UserItemSettings

if TYPE_CHECKING:  # fitting.py imports this module
    from services.useritem.fitting import Fitter

MAPPED_KINDS = (MF,)  # the kinds with item vectors to map content into


def check_content(kind: str) -> None:
    """INVALID_ARGUMENT for item content in a Fit of a kind that learns no content map."""
    if kind not in MAPPED_KINDS:
        raise InvalidArgument(
            f"is given to a Fit of kind {kind}, which has no item vectors to map content into (EASE's items "
            "are columns of its item-item matrix): fit kind MODEL_KIND_MF to learn a content map, or leave "
            "item_content out",
            field="item_content",
        )


def check_content_items(content: ContentBuffer, items: Sequence[str]) -> bool:
    """Whether the Fit learns a content map (it has content); INVALID_ARGUMENT when too few of its items
    have both content and interactions to learn one from."""
    if not len(content):
        return False
    both = content.covering(items)
    if both < MIN_ITEMS:
        raise InvalidArgument(
            f"{both} of the Fit's items have both content and interactions; a content map needs at least "
            f"{MIN_ITEMS} (item_content's item ids must be items of the interactions)",
            field="item_content",
        )
    return True


def with_content_map(model: TrainedModel, content: ContentBuffer) -> TrainedModel:
    """`model` with the content map learnt from its items that have content: [item vector, item bias]."""
    rows, vectors = content.of(model.items)
    targets = np.hstack([model.item_vectors[rows], model.item_bias[rows, None]])
    return dataclasses.replace(model, content_map=learn_content_map(content.space, vectors, targets))


def content_map_of(model: TrainedModel) -> ContentMap:
    """The model's content map; FAILED_PRECONDITION when it has none, saying why and what to do."""
    if model.kind not in MAPPED_KINDS:
        raise FailedPrecondition(
            f"model {model.name!r} (version {model.version}) is of kind {model.kind}, which has no item "
            "vectors to map content into: Fit it with kind MODEL_KIND_MF and item_content for cold-start items"
        )
    if model.content_map is None:
        raise FailedPrecondition(
            f"model {model.name!r} (version {model.version}) has no content map: it was fitted without item "
            "content. Fit it again with item_content (FitRequest.item_content) to fold in items"
        )
    return model.content_map


def with_items(model: TrainedModel, items: list[str], mapped: np.ndarray) -> tuple[TrainedModel, int]:
    """`model` plus `items` (replaced where folded in before), their [vector, bias] rows `mapped`; and how
    many were new."""
    index = model.item_index
    replaced = [(index[item], row) for row, item in enumerate(items) if item in index]
    added = [row for row, item in enumerate(items) if item not in index]
    vectors = np.vstack([model.item_vectors, mapped[added, :-1]]).astype(np.float32)
    bias = np.concatenate([model.item_bias, mapped[added, -1]]).astype(np.float32)
    for target, row in replaced:
        vectors[target], bias[target] = mapped[row, :-1], mapped[row, -1]
    names = [*model.items, *(items[row] for row in added)]
    return dataclasses.replace(model, items=names, item_vectors=vectors, item_bias=bias), len(added)


class ColdItems:
    """FoldInItems: new items' vectors from their content, in a new serving version."""

    def __init__(self, catalog: Catalog, fitter: "Fitter", settings: UserItemSettings) -> None:
        self._catalog = catalog
        self._fitter = fitter
        self._settings = settings
        self._lock = asyncio.Lock()

    async def fold_in(self, request: cpb.FoldInItemsRequest) -> cpb.FoldInItemsResponse:
        limit = self._settings.max_inputs_per_request
        if not request.items or len(request.items) > limit:
            raise InvalidArgument(
                f"FoldInItems takes 1 to {limit} items (USERITEM_MAX_INPUTS_PER_REQUEST); got {len(request.items)}",
                field="items",
            )
        given: dict[str, tuple[int, np.ndarray]] = {}
        for index, content in enumerate(request.items):
            vector = content_vector(content, f"items[{index}]", self._settings.max_id_bytes)
            given.pop(content.item_id, None)
            given[content.item_id] = (index, vector)
        async with self._lock:
            if self._fitter.busy:
                raise Aborted(
                    "a Fit is running on this worker, and the version it promotes would not hold items folded "
                    "in now: retry when it is done (or give their content to the Fit)"
                )
            model = self._catalog.get(request.model)
            content_map = content_map_of(model)
            self._check(model, content_map, request.content_space, given)
            items = list(given)
            vectors = np.stack([vector for _, vector in given.values()])
            mapped = content_map.apply(vectors)
            updated, added = await asyncio.to_thread(with_items, model, items, mapped)
            await self._fitter.save(updated)
            self._catalog.put(updated)
        rows = {item: row for row, item in enumerate(items)}
        return cpb.FoldInItemsResponse(
            model=updated.card.ref(),
            vectors=[to_wire(mapped[rows[content.item_id], :-1]) for content in request.items],
            added=added,
        )

    def _check(
        self,
        model: TrainedModel,
        content_map: ContentMap,
        space: str,
        given: dict[str, tuple[int, np.ndarray]],
    ) -> None:
        """The request fits the model: content of the map's space and dimension, no learnt item, room."""
        if not space:
            raise InvalidArgument(
                f"is empty: name the space of the content vectors (model {model.name!r}'s content map was "
                f"trained on {content_map.space!r}; the gateway names it when it encodes inputs)",
                field="content_space",
            )
        if space != content_map.space:
            raise FailedPrecondition(
                f"the content is in space {space!r}, but model {model.name!r} (version {model.version}) learnt "
                f"its content map from space {content_map.space!r}: vectors of another space mean nothing to "
                f"it. Encode the content with a model of space {content_map.space!r} (through the gateway: "
                "content_space), or Fit again with content of this space"
            )
        for item, (index, vector) in given.items():
            if vector.shape[0] != content_map.dimension:
                raise InvalidArgument(
                    f"has {vector.shape[0]} dimensions; the content map of model {model.name!r} takes "
                    f"{content_map.dimension} (space {content_map.space!r})",
                    field=f"items[{index}].vector",
                )
            row = model.item_index.get(item)
            if row is not None and model.item_counts[row] > 0:
                raise AlreadyExists(
                    f"{item!r} is an item model {model.name!r} (version {model.version}) learnt from "
                    "interactions: its vector comes from them, not from content; leave it out",
                    field=f"items[{index}].item_id",
                )
        new = sum(1 for item in given if item not in model.item_index)
        if len(model.users) + len(model.items) + new > self._settings.max_ids:
            raise InvalidArgument(
                f"the model would have more than {self._settings.max_ids} users and items (USERITEM_MAX_IDS) "
                "with these items; fit it again on fewer",
                field="items",
            )
