"""Which model encodes a request's inputs: the one named (checked against the inputs' kinds), or the
default for their kind, within a space when one is asked for."""

from collections.abc import Iterable, Sequence

from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument
from services.common.inputs import kind_name, kind_of
from services.common.model_card import ModelCard
from services.gateway.routing import Router


class ModelChooser:
    def __init__(self, router: Router, preferred: dict[int, str]) -> None:
        self._router = router
        self._preferred = preferred

    def card_for(self, model: str, inputs: Sequence[pb.Input], field: str, space: str = "") -> ModelCard:
        """The named model (checked against the inputs), or the default one for the inputs' kind (for mixed
        kinds: the first kind's default, if it accepts them all)."""
        kinds = sorted({kind_of(item, index) for index, item in enumerate(inputs)})
        if model:
            card = self._router.card(model)
            refused = [kind for kind in kinds if kind not in card.input_kinds]
            if refused:
                raise InvalidArgument(
                    f"model {model!r} does not accept {', '.join(map(kind_name, refused))} inputs; it accepts "
                    f"{', '.join(map(kind_name, card.input_kinds))}"
                )
        else:
            card = self.default_card(kinds[0], space)
            if not set(kinds) <= set(card.input_kinds):
                raise InvalidArgument(
                    f"mix {' and '.join(map(kind_name, kinds))} inputs and no model is named; "
                    "name a model that accepts them all, or send each kind separately",
                    field=field,
                )
        if space and card.space != space:
            raise InvalidArgument(
                f"model {card.id!r} writes into space {card.space!r}, not the requested space {space!r}"
            )
        return card

    def default_card(self, kind: int, space: str = "") -> ModelCard:
        return self._router.default_card(kind, self._preferred.get(kind, ""), space)

    def shared_space(self, kinds: Iterable[int]) -> str:
        """A space where every one of `kinds` has a model: the first kind's default model's space if it
        qualifies, then the next kind's, ...; empty when there is none."""
        ordered = list(dict.fromkeys(kinds))
        spaces = self._router.spaces
        shared = set.intersection(*(spaces.get(kind, set()) for kind in ordered)) if ordered else set()
        if not shared:
            return ""
        for kind in ordered:
            space = self.default_card(kind).space
            if space in shared:
                return space
        return min(shared)
