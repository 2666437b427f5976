"""Checks every text backend applies to its inputs before tokenising."""

from collections.abc import Sequence

from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument


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
