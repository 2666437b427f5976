"""What kind of thing an Input holds, and checks that every model applies to its inputs."""

from collections.abc import Sequence

from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument

KIND_OF_FIELD = {
    "text": pb.INPUT_KIND_TEXT,
    "image": pb.INPUT_KIND_IMAGE,
    "user_id": pb.INPUT_KIND_USER,
    "item_id": pb.INPUT_KIND_ITEM,
}
FIELD_OF_KIND = {kind: field for field, kind in KIND_OF_FIELD.items()}


def kind_name(kind: int) -> str:
    return pb.InputKind.Name(kind).removeprefix("INPUT_KIND_").lower()


def kind_of(item: pb.Input, index: int) -> int:
    """The InputKind of `item`; INVALID_ARGUMENT when it holds nothing."""
    field = item.WhichOneof("content")
    if field is None:
        raise InvalidArgument("is empty: set one of text, image, user_id, item_id", field=f"inputs[{index}]")
    return KIND_OF_FIELD[field]


def check_batch_size(inputs: Sequence[object], limit: int, field: str = "inputs") -> None:
    if not inputs:
        raise InvalidArgument(f"is empty: send 1 to {limit} inputs", field=field)
    if len(inputs) > limit:
        raise InvalidArgument(
            f"has {len(inputs)} items; the limit is {limit} per request "
            "(split the batch, or use the streaming call for bulk)",
            field=field,
        )


def check_kinds(kinds: Sequence[int], field: str) -> None:
    """Every value is a known InputKind."""
    unknown = [kind for kind in kinds if kind not in pb.InputKind.values()]
    if unknown:
        raise InvalidArgument(f"has unknown InputKind values {unknown}", field=field)
