"""What every text backend shares: the checks of its inputs before tokenising, and their cost."""

from collections.abc import Sequence

from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument
from services.encoder.backend import EncoderBackend


class TextBackend(EncoderBackend):
    """A text model; `_max_chars`: the longest text it accepts (TEXT_MAX_TEXT_CHARS)."""

    _max_chars: int

    def cost(self, item: pb.Input) -> int:
        """Characters: what tokenising costs (a text over the limit costs the limit: it is refused unread)."""
        return min(len(item.text), self._max_chars)


def texts_of(inputs: Sequence[pb.Input], model_id: str, max_chars: int) -> list[str]:
    """The inputs' texts; INVALID_ARGUMENT for non-text, blank or over-long inputs, naming the index."""
    texts = []
    for index, item in enumerate(inputs):
        if item.WhichOneof("content") != "text":
            raise InvalidArgument(
                f"is not text; model {model_id!r} accepts text only", field=f"inputs[{index}]"
            )
        if not item.text.strip():
            raise InvalidArgument(
                "is empty; send at least one non-blank character", field=f"inputs[{index}].text"
            )
        if len(item.text) > max_chars:
            raise InvalidArgument(
                f"has {len(item.text)} characters; the limit is {max_chars} (TEXT_MAX_TEXT_CHARS)",
                field=f"inputs[{index}].text",
            )
        texts.append(item.text)
    return texts


def too_long(index: int, tokens: int, limit: int, model_id: str) -> InvalidArgument:
    return InvalidArgument(
        f"is {tokens} tokens; model {model_id!r} takes at most {limit} "
        "(options.strict is set: unset it to embed the first tokens only)",
        field=f"inputs[{index}].text",
    )
