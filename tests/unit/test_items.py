"""Item ids and payloads: standard JSON objects of bounded size and depth, refusals naming the field and
the caller's own setting."""

import json

import pytest

from services.common.errors import InvalidArgument
from services.common.items import MAX_PAYLOAD_DEPTH, ItemRules

RULES = ItemRules(max_id_bytes=16, max_payload_bytes=16_384, prefix="INDEX_")


def nested(depth: int) -> str:
    """An object whose innermost value sits `depth` objects/arrays deep."""
    return '{"a": ' + "[" * (depth - 1) + "1" + "]" * (depth - 1) + "}"


@pytest.mark.parametrize(
    "payload",
    ['{"score": NaN}', '{"score": Infinity}', '{"score": -Infinity}', '{"big": 1e400}', '{"big": -1e999}'],
)
def test_non_standard_or_non_finite_numbers_are_refused(payload: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^items\[0\]\.payload_json is not valid JSON"):
        RULES.check("a", payload, "items[0]")


def test_nesting_up_to_the_limit_is_accepted_and_beyond_it_refused() -> None:
    assert json.loads(nested(MAX_PAYLOAD_DEPTH))
    RULES.check("a", nested(MAX_PAYLOAD_DEPTH), "items[0]")
    with pytest.raises(
        InvalidArgument, match=rf"items\[0\]\.payload_json nests deeper than {MAX_PAYLOAD_DEPTH}"
    ):
        RULES.check("a", nested(MAX_PAYLOAD_DEPTH + 1), "items[0]")


def test_a_payload_nested_past_pythons_own_recursion_limit_is_a_clear_refusal() -> None:
    """8,000 levels in under 16 KiB made the parser raise RecursionError (answered INTERNAL)."""
    payload = nested(8_000)
    assert len(payload.encode()) < 16_384
    with pytest.raises(InvalidArgument, match="nests deeper than"):
        RULES.check("a", payload, "items[3]")


def test_refusals_name_the_setting_of_the_service_that_refused() -> None:
    gateway = ItemRules(max_id_bytes=4, max_payload_bytes=8, prefix="GATEWAY_")
    with pytest.raises(InvalidArgument, match=r"ids\[2\] is longer than 4 bytes \(GATEWAY_MAX_ID_BYTES\)"):
        gateway.check_id("abcde", "ids[2]")
    with pytest.raises(
        InvalidArgument,
        match=r"items\[1\]\.payload_json is 12 bytes; the limit is 8 \(GATEWAY_MAX_PAYLOAD_BYTES\)",
    ):
        gateway.check("ab", '{"k": "vvv"}', "items[1]")
    with pytest.raises(InvalidArgument, match=r"INDEX_MAX_ID_BYTES"):
        RULES.check_id("x" * 17, "ids[0]")
