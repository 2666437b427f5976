"""Input kinds and the per-request batch size check."""

import grpc
import pytest
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument
from services.common.inputs import check_batch_size, kind_name, kind_of


@pytest.mark.parametrize(
    ("item", "kind", "name"),
    [
        (pb.Input(text="a cat on a mat"), pb.INPUT_KIND_TEXT, "text"),
        (pb.Input(image=b"\x89PNG\r\n\x1a\n"), pb.INPUT_KIND_IMAGE, "image"),
        (pb.Input(user_id="user-7"), pb.INPUT_KIND_USER, "user"),
        (pb.Input(item_id="sku-42"), pb.INPUT_KIND_ITEM, "item"),
    ],
)
def test_kind_of_each_content_field(item: pb.Input, kind: int, name: str) -> None:
    assert kind_of(item, 0) == kind
    assert kind_name(kind) == name


def test_kind_of_follows_the_last_field_set_in_the_oneof() -> None:
    item = pb.Input(text="hello")
    item.user_id = "user-1"
    assert kind_of(item, 0) == pb.INPUT_KIND_USER


def test_kind_of_an_empty_input_names_its_index() -> None:
    with pytest.raises(InvalidArgument) as error:
        kind_of(pb.Input(), 3)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[3]" in error.value.message
    assert "empty" in error.value.message


def test_check_batch_size_refuses_an_empty_batch_and_gives_the_range() -> None:
    with pytest.raises(InvalidArgument) as error:
        check_batch_size([], 64)
    assert "inputs is empty" in error.value.message
    assert "64" in error.value.message


def test_check_batch_size_refuses_over_the_limit_naming_count_and_limit() -> None:
    inputs = [pb.Input(text=str(i)) for i in range(65)]
    with pytest.raises(InvalidArgument) as error:
        check_batch_size(inputs, 64)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "65 items" in error.value.message
    assert "limit is 64" in error.value.message


def test_check_batch_size_accepts_one_and_exactly_the_limit() -> None:
    check_batch_size([pb.Input(text="x")], 64)
    check_batch_size([pb.Input(text=str(i)) for i in range(64)], 64)


def test_check_batch_size_uses_the_given_field_name() -> None:
    with pytest.raises(InvalidArgument) as error:
        check_batch_size([pb.Input(text="a"), pb.Input(text="b")], 1, field="queries")
    assert error.value.message.startswith("queries has 2 items")
