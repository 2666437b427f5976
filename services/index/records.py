"""What the append-only log holds, and how one segment's bytes are read back.

A segment starts with `MAGIC`, then holds frames `<u32 length><u32 crc32(body)><u32 crc32(first 8 bytes)>
<body>`, one per upserted or deleted item or new generation of a space; a segment that is complete (the writer moved on to the next)
ends with a seal frame. The header checks itself, so a flipped bit in a length is damage, not a frame
that seems to run past the end of the file.

Format 1, written before the segment header existed, has no `MAGIC`, no seal and no header checksum
(`<u32 length><u32 crc32(body)><body>`); it is still read, so an upgrade loses nothing.

Reading a segment tells apart an *incomplete* last record (the file ends inside it, or everything from
inside it to the end of the file is zero bytes: a crash after the file was extended and before the data
reached it), which a kill mid-write leaves and which was never acknowledged, from *damage* (a complete
frame whose checksum fails, a body that does not decode, bytes after the seal), which must never be cut
silently.
"""

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"\x89IXLOG2\n"  # as a format-1 length (LE u32) it would be 1.3 GB: no format-1 segment starts so
_HEAD = struct.Struct("<III")  # length, crc32(body), crc32(length and crc32(body))
_V1_HEAD = struct.Struct("<II")
_UPSERT, _DELETE, _SEAL, _GENERATION = 1, 2, 3, 4
# No record is this large (one item of a gRPC message of at most 64 MiB); a format-1 length past it is damage
# rather than a record that the end of the file cut off. Any one flipped bit of MAGIC's first four bytes
# leaves them above it, so a format-2 segment whose header was hit reads as damage, never as a torn tail.
_MAX_BODY = 1 << 26
_RESYNC_CHUNK = 1 << 22


@dataclass
class Item:
    """One indexed item as the store keeps it; `vector` is L2-normalised float32."""

    id: str
    vector: np.ndarray
    kind: int = 0
    payload_json: str = ""
    model_id: str = ""
    model_version: str = ""


@dataclass(frozen=True)
class Generation:
    """`space` now holds generation `epoch` of its items, `dimension`-d: what the shard held of it is gone
    (dimension 0: the space is dropped here)."""

    epoch: int
    dimension: int


@dataclass
class Op:
    """Upsert `item` into `space`, or (item None) delete `item_id` from it; or (`generation` set) start a
    new generation of the space."""

    space: str
    item_id: str = ""
    item: Item | None = field(default=None)
    generation: Generation | None = None


def _text(value: str) -> bytes:
    data = value.encode()
    return struct.pack("<I", len(data)) + data


def body(op: Op) -> bytes:
    """The body of one op's record (the same in both formats)."""
    if op.generation is not None:
        return (
            bytes([_GENERATION])
            + _text(op.space)
            + struct.pack("<QI", op.generation.epoch, op.generation.dimension)
        )
    if op.item is None:
        return bytes([_DELETE]) + _text(op.space) + _text(op.item_id)
    item = op.item
    vector = np.ascontiguousarray(item.vector, dtype="<f4")
    return b"".join(
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


def frame(record: bytes) -> bytes:
    """A format-2 frame around a record body."""
    head = struct.pack("<II", len(record), zlib.crc32(record))
    return head + struct.pack("<I", zlib.crc32(head)) + record


def frame_v1(record: bytes) -> bytes:
    """A format-1 frame (salvage rewrites a damaged format-1 segment in its own format)."""
    return _V1_HEAD.pack(len(record), zlib.crc32(record)) + record


def encode(op: Op) -> bytes:
    """The framed record of one op."""
    return frame(body(op))


SEAL = frame(bytes([_SEAL]))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def take(self, size: int) -> bytes:
        chunk = self._data[self._at : self._at + size]
        if len(chunk) != size:
            raise ValueError("record body ends early")
        self._at += size
        return chunk

    def text(self) -> str:
        (size,) = struct.unpack("<I", self.take(4))
        return self.take(size).decode()

    def done(self) -> None:
        if self._at != len(self._data):
            raise ValueError(f"{len(self._data) - self._at} bytes after the record's last field")


def decode(record: bytes) -> Op | None:
    """The op of a record body; None for a seal."""
    reader = _Reader(record)
    (kind,) = reader.take(1)
    if kind == _SEAL:
        reader.done()
        return None
    space = reader.text()
    if kind == _GENERATION:
        epoch, dimension = struct.unpack("<QI", reader.take(12))
        reader.done()
        return Op(space, generation=Generation(epoch, dimension))
    if kind == _DELETE:
        op = Op(space, reader.text())
        reader.done()
        return op
    if kind != _UPSERT:
        raise ValueError(f"unknown record type {kind}")
    item_id = reader.text()
    (input_kind,) = reader.take(1)
    model_id, model_version, payload = reader.text(), reader.text(), reader.text()
    (dim,) = struct.unpack("<I", reader.take(4))
    vector = np.frombuffer(reader.take(4 * dim), dtype="<f4").astype(np.float32)
    reader.done()
    return Op(space, item_id, Item(item_id, vector, input_kind, payload, model_id, model_version))


@dataclass
class Frame:
    """What starts at one offset: an intact record (`op`, None for a seal; `record`, its body) ending at
    `end`, an incomplete last record (`incomplete`), or damage (`damage` says what; `end` is where the frame
    claims to end, when its header is intact, else 0)."""

    end: int = 0
    op: Op | None = None
    seal: bool = False
    incomplete: bool = False
    damage: str = ""
    record: bytes = b""


def _zero_from(data: bytes, at: int) -> bool:
    """Every byte of `data` from before `at` to its end is zero (the zero run starts before `at`)."""
    return len(data.rstrip(b"\0")) < at


def read_frame(data: bytes, at: int, version: int) -> Frame:
    """The frame of a format-`version` segment that starts at `at` (< len(data))."""
    head = _HEAD.size if version == 2 else _V1_HEAD.size
    if len(data) - at < head:
        return Frame(incomplete=True)
    if version == 2:
        length, crc, head_crc = _HEAD.unpack_from(data, at)
        if zlib.crc32(data[at : at + 8]) != head_crc:
            if _zero_from(data, at + head):
                return Frame(incomplete=True)
            return Frame(damage="frame header checksum mismatch")
    else:
        length, crc = _V1_HEAD.unpack_from(data, at)
        if length > _MAX_BODY:
            if _zero_from(data, at + head):
                return Frame(incomplete=True)
            return Frame(damage=f"impossible record length {length}")
    end = at + head + length
    if end > len(data):
        return Frame(incomplete=True)
    record = data[at + head : end]
    if zlib.crc32(record) != crc:
        if _zero_from(data, end):
            return Frame(incomplete=True)
        return Frame(end, damage="record checksum mismatch")
    try:
        op = decode(record)
    except (ValueError, UnicodeDecodeError, struct.error) as error:
        return Frame(end, damage=f"undecodable record ({error})")
    if op is None and version == 1:
        return Frame(end, damage="undecodable record (a seal in a format-1 segment)")
    return Frame(end, op, seal=op is None, record=record)


def version_of(data: bytes) -> tuple[int, int]:
    """(format, offset of the first frame) of a segment's bytes; a segment shorter than MAGIC and a prefix
    of it is format 2 with an incomplete header (offset 0, nothing intact)."""
    if data.startswith(MAGIC):
        return 2, len(MAGIC)
    if MAGIC.startswith(data):
        return 2, 0
    return 1, 0


@dataclass
class Scan:
    """What reading one segment found: the ops of its intact frames, in order, and how it ends."""

    version: int
    ops: list[Op]
    end: int  # where the intact part ends (its header included)
    size: int
    sealed: bool = False
    damage: str = ""  # what is wrong at `end`; "" when the segment reads to its end or an incomplete tail
    records: int = 0

    @property
    def torn(self) -> bool:
        """The segment ends in an incomplete record (bytes from `end` on), which may be cut."""
        return not self.damage and self.end < self.size


def scan(data: bytes) -> Scan:
    version, at = version_of(data)
    if version == 2 and at == 0:
        return Scan(2, [], 0, len(data))
    result = Scan(version, [], at, len(data))
    for found in frames(data, at, version):
        if found.incomplete:
            return result
        if found.damage:
            result.damage = found.damage
            return result
        if result.sealed:
            result.damage = "data after the segment's seal"
            return result
        if found.op is not None:
            result.ops.append(found.op)
            result.records += 1
        result.sealed = found.seal
        result.end = found.end
    return result


def frames(data: bytes, at: int, version: int) -> Iterator[Frame]:
    """The frames from `at` on, up to the first that is not intact (which is yielded too)."""
    while at < len(data):
        found = read_frame(data, at, version)
        yield found
        if found.incomplete or found.damage:
            return
        at = found.end


def next_intact(data: bytes, start: int, version: int) -> int | None:
    """The first offset from `start` on where an intact frame starts (salvage resynchronises there after a
    damaged stretch), or None. Offsets whose would-be length does not fit in the file or whose body would
    not start with a record type are skipped without computing any checksum."""
    head = _HEAD.size if version == 2 else _V1_HEAD.size
    raw = np.frombuffer(data, dtype=np.uint8)
    last = len(data) - head - 1  # the last offset where a header and a one-byte body fit
    for chunk in range(start, last + 1, _RESYNC_CHUNK):
        offsets = np.arange(chunk, min(chunk + _RESYNC_CHUNK, last + 1), dtype=np.int64)
        lengths = (
            raw[offsets].astype(np.int64)
            | raw[offsets + 1].astype(np.int64) << 8
            | raw[offsets + 2].astype(np.int64) << 16
            | raw[offsets + 3].astype(np.int64) << 24
        )
        fits = (lengths >= 1) & (lengths <= len(data) - offsets - head)
        typed = np.isin(raw[offsets + head], (_UPSERT, _DELETE, _SEAL, _GENERATION))
        for offset in offsets[fits & typed].tolist():
            found = read_frame(data, offset, version)
            if not (found.incomplete or found.damage):
                return int(offset)
    return None
