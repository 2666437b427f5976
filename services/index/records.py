"""What the append-only log holds: one framed record per upserted or deleted item.

A frame is `<u32 length><u32 crc32 of body><body>`; a torn tail (a kill in the middle of a write) shows
up as a short frame or a crc mismatch, and replay stops there: nothing past it was ever acknowledged.
"""

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

_FRAME = struct.Struct("<II")
_UPSERT, _DELETE = 1, 2


@dataclass
class Item:
    """One indexed item as the store keeps it; `vector` is L2-normalised float32."""

    id: str
    vector: np.ndarray
    kind: int = 0
    payload_json: str = ""
    model_id: str = ""
    model_version: str = ""


@dataclass
class Op:
    """Upsert `item` into `space`, or (item None) delete `item_id` from it."""

    space: str
    item_id: str
    item: Item | None = field(default=None)


def _text(value: str) -> bytes:
    data = value.encode()
    return struct.pack("<I", len(data)) + data


def encode(op: Op) -> bytes:
    """The framed record of one op."""
    if op.item is None:
        body = bytes([_DELETE]) + _text(op.space) + _text(op.item_id)
    else:
        item = op.item
        vector = np.ascontiguousarray(item.vector, dtype="<f4")
        body = b"".join(
            (
                bytes([_UPSERT]),
                _text(op.space),
                _text(item.id),
                struct.pack("<B", item.kind),
                _text(item.model_id),
                _text(item.model_version),
                _text(item.payload_json),
                struct.pack("<I", vector.shape[0]),
                vector.tobytes(),
            )
        )
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


class _Reader:
    def __init__(self, body: bytes) -> None:
        self._body = body
        self._at = 0

    def take(self, size: int) -> bytes:
        chunk = self._body[self._at : self._at + size]
        if len(chunk) != size:
            raise ValueError("record body ends early")
        self._at += size
        return chunk

    def text(self) -> str:
        (size,) = struct.unpack("<I", self.take(4))
        return self.take(size).decode()


def _decode_body(body: bytes) -> Op:
    reader = _Reader(body)
    (kind,) = reader.take(1)
    space, item_id = reader.text(), None
    if kind == _DELETE:
        return Op(space, reader.text())
    if kind != _UPSERT:
        raise ValueError(f"unknown record type {kind}")
    item_id = reader.text()
    (input_kind,) = reader.take(1)
    model_id, model_version, payload = reader.text(), reader.text(), reader.text()
    (dim,) = struct.unpack("<I", reader.take(4))
    vector = np.frombuffer(reader.take(4 * dim), dtype="<f4").astype(np.float32)
    return Op(space, item_id, Item(item_id, vector, input_kind, payload, model_id, model_version))


def decode_all(data: bytes) -> tuple[list[Op], int]:
    """The ops of whole, intact frames from the start of `data`, and the byte length they cover."""
    ops: list[Op] = []
    at = 0
    for op, end in _frames(data):
        ops.append(op)
        at = end
    return ops, at


def _frames(data: bytes) -> Iterator[tuple[Op, int]]:
    at = 0
    while at + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, at)
        body = data[at + _FRAME.size : at + _FRAME.size + length]
        if len(body) != length or zlib.crc32(body) != crc:
            return
        try:
            op = _decode_body(body)
        except (ValueError, UnicodeDecodeError, struct.error):
            return
        at += _FRAME.size + length
        yield op, at
