"""The serving version of each user-item model. A Fit replaces a model's entry whole (one reference
assignment), and every call reads its model once, so no call sees half of one version and half of
another."""

import re

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.useritem.model import TrainedModel

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_model_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"model name {name!r} is not valid: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


class Catalog:
    def __init__(self, default: str, models: dict[str, TrainedModel] | None = None) -> None:
        check_model_name(default)
        self.default = default
        self._models: dict[str, TrainedModel] = dict(models or {})

    @property
    def models(self) -> list[TrainedModel]:
        return [self._models[name] for name in sorted(self._models)]

    def put(self, model: TrainedModel) -> None:
        self._models = {**self._models, model.name: model}

    def get(self, name: str) -> TrainedModel:
        """The serving version of `name` (empty: the default model)."""
        model = self._models.get(name or self.default)
        if model is not None:
            return model
        served = ", ".join(sorted(self._models)) or "none yet"
        if not name:
            raise FailedPrecondition(
                f"the default model {self.default!r} has not been trained yet (models here: {served}); "
                "call Fit first"
            )
        raise InvalidArgument(
            f"unknown model {name!r}; models here: {served} (Fit with model={name!r} trains it)"
        )


def user_row(model: TrainedModel, user_id: str, field: str = "user_id") -> int:
    if not user_id:
        raise InvalidArgument("is empty", field=field)
    row = model.user_index.get(user_id)
    if row is None:
        raise NotFound(
            f"{user_id!r} is not a user of model {model.name!r} (version {model.version}); "
            "FoldIn makes a vector for a new user from a few interactions",
            field=field,
        )
    return row


def item_row(model: TrainedModel, item_id: str, field: str = "item_id") -> int:
    if not item_id:
        raise InvalidArgument("is empty", field=field)
    row = model.item_index.get(item_id)
    if row is None:
        raise NotFound(
            f"{item_id!r} is not an item of model {model.name!r} (version {model.version})", field=field
        )
    return row
