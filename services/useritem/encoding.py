"""The user-item worker's models for the shared Encoder servicer: the serving trained versions, whose
user_id and item_id inputs encode to their learnt vectors (a lookup: no batching needed)."""

from collections.abc import Sequence

import numpy as np
from embeddings.v1 import types_pb2 as pb

from services.encoder.backend import Prepared
from services.encoder.models import ModelSource, ServedModel
from services.useritem.catalog import Catalog, item_row, user_row
from services.useritem.model import TrainedModel


class TrainedVectors(ServedModel):
    """One trained version's user and item vectors (EASE: a user's weighted history row, an item's
    column of B; their dot is the user's score of the item)."""

    def __init__(self, model: TrainedModel) -> None:
        self.model = model
        self.card = model.card

    async def encode(
        self, inputs: Sequence[pb.Input], strict: bool, timeout: float | None, caller: str
    ) -> tuple[np.ndarray, Sequence[Prepared]]:
        model = self.model
        rows = [
            model.user_vector(user_row(model, item.user_id, f"inputs[{index}].user_id"))[0]
            if item.WhichOneof("content") == "user_id"
            else model.item_vector(item_row(model, item.item_id, f"inputs[{index}].item_id"))
            for index, item in enumerate(inputs)
        ]
        return np.stack(rows), [Prepared(None)] * len(rows)


class TrainedVersions(ModelSource):
    """The catalog's serving versions, as they are at each call (a Fit replaces one whole)."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    async def start(self) -> None:
        """Nothing to load: the worker's start-up puts the stored versions in the catalog, Fit the new ones."""

    async def close(self) -> None:
        """Nothing to release."""

    def models(self) -> list[ServedModel]:
        return [TrainedVectors(model) for model in self._catalog.models]

    def pick(self, name: str, kinds: set[int]) -> ServedModel:
        return TrainedVectors(self._catalog.get(name))
