"""What an indexed item's id and payload must be: checked by every process an item passes through, each
with its own limits and naming its own settings in refusals."""

import json
import math
from dataclasses import dataclass

from services.common.errors import InvalidArgument

# Deepest nesting of objects and arrays in a payload (Python's parser itself fails at about 1,000).
MAX_PAYLOAD_DEPTH = 32


@dataclass(frozen=True)
class ItemRules:
    """One service's limits on items; `prefix` is its settings' prefix (e.g. INDEX_), so a refusal names
    the setting that set the limit it broke."""

    max_id_bytes: int
    max_payload_bytes: int
    prefix: str

    def check(self, item_id: str, payload_json: str, field: str) -> None:
        """The id and payload of the item at `field` (e.g. items[3])."""
        self.check_id(item_id, f"{field}.id")
        self.check_payload(payload_json, f"{field}.payload_json")

    def check_id(self, item_id: str, field: str) -> None:
        """A non-empty id of at most max_id_bytes UTF-8 bytes."""
        if not item_id:
            raise InvalidArgument("is empty; every item needs an id", field=field)
        if len(item_id.encode()) > self.max_id_bytes:
            raise InvalidArgument(
                f"is longer than {self.max_id_bytes} bytes ({self.prefix}MAX_ID_BYTES)", field=field
            )

    def check_payload(self, payload_json: str, field: str) -> None:
        """Empty, or a JSON object of at most max_payload_bytes bytes."""
        if not payload_json:
            return
        size = len(payload_json.encode())
        if size > self.max_payload_bytes:
            raise InvalidArgument(
                f"is {size} bytes; the limit is {self.max_payload_bytes} ({self.prefix}MAX_PAYLOAD_BYTES)",
                field=field,
            )
        try:
            payload = json.loads(payload_json, parse_constant=_no_constant, parse_float=_finite)
        except ValueError as error:
            raise InvalidArgument(f"is not valid JSON: {error}", field=field) from None
        except RecursionError:
            raise InvalidArgument(f"nests deeper than {MAX_PAYLOAD_DEPTH} levels", field=field) from None
        if not isinstance(payload, dict):
            raise InvalidArgument(f"must be a JSON object, not {type(payload).__name__}", field=field)
        if _depth(payload) > MAX_PAYLOAD_DEPTH:
            raise InvalidArgument(f"nests deeper than {MAX_PAYLOAD_DEPTH} levels", field=field)


def payload_terms(payload_json: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of a (checked) payload's top-level string values: what payload filters match,
    on every index (the shards' postings, Milvus's terms field)."""
    if not payload_json:
        return []
    payload = json.loads(payload_json)
    return [(key, value) for key, value in payload.items() if isinstance(value, str)]


def _no_constant(name: str) -> float:
    """NaN and Infinity are Python's extensions of JSON: refused, so payloads stay standard JSON."""
    raise ValueError(f"{name} is not a JSON value (standard JSON has no NaN or Infinity)")


def _finite(text: str) -> float:
    """A JSON number as a float; one too large for a double (1e400) is refused rather than made infinite."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def _depth(value: object) -> int:
    """How deeply objects and arrays nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest
