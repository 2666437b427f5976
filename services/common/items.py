"""What an indexed item's id and payload must be: checked by every process an item passes through, each
with its own limits and naming its own settings in refusals."""

import json
from dataclasses import dataclass

from services.common.errors import InvalidArgument


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
            payload = json.loads(payload_json)
        except ValueError as error:
            raise InvalidArgument(f"is not valid JSON: {error}", field=field) from None
        if not isinstance(payload, dict):
            raise InvalidArgument(f"must be a JSON object, not {type(payload).__name__}", field=field)
