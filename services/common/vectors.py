"""Vectors on the wire: shaping a model's float32 output (truncate, normalise, cast) and decoding bytes.

The model's full float32 output is what is computed and cached; `shape` applies the caller's options
after it, so one cached entry serves every combination of options.
"""

import numpy as np
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument

_ITEM_BYTES = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_INT8: 1}


def check_options(options: pb.EncodeOptions, dimension: int, model_id: str) -> None:
    """Refuse options the model cannot honour, naming the field and the limit."""
    if options.dtype not in pb.DType.values():
        raise InvalidArgument(
            f"options.dtype={options.dtype} is not a known DType; use one of {', '.join(pb.DType.keys()[1:])}"
        )
    if options.dimensions > dimension:
        raise InvalidArgument(
            f"options.dimensions={options.dimensions} exceeds the dimension of model {model_id!r} "
            f"({dimension}); use 1..{dimension}, or 0 for the full dimension"
        )


def shape(raw: np.ndarray, options: pb.EncodeOptions) -> list[pb.Vector]:
    """Turn rows of full float32 model output into wire vectors as the options ask."""
    matrix: np.ndarray = np.asarray(raw, dtype=np.float32)
    if options.dimensions:
        matrix = matrix[:, : options.dimensions]
    if not options.HasField("normalize") or options.normalize:
        matrix = l2_normalize(matrix)
    return [to_wire(row, options.dtype) for row in matrix]


def l2_normalize(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def to_wire(row: np.ndarray, dtype: int = pb.DTYPE_FLOAT32) -> pb.Vector:
    """One float vector as little-endian bytes of `dtype`."""
    dim = int(row.shape[0])
    if dtype == pb.DTYPE_FLOAT16:
        return pb.Vector(data=row.astype("<f2").tobytes(), dim=dim, dtype=dtype)
    if dtype == pb.DTYPE_INT8:
        peak = float(np.max(np.abs(row))) if dim else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        quantised = np.clip(np.rint(row / scale), -127, 127).astype(np.int8)
        return pb.Vector(data=quantised.tobytes(), dim=dim, dtype=dtype, scale=scale)
    if dtype == pb.DTYPE_BINARY:
        return pb.Vector(data=np.packbits(row > 0).tobytes(), dim=dim, dtype=dtype)
    return pb.Vector(data=row.astype("<f4").tobytes(), dim=dim, dtype=pb.DTYPE_FLOAT32)


def from_wire(vector: pb.Vector, field: str = "vector") -> np.ndarray:
    """Decode a wire vector to float32, refusing inconsistent lengths and non-finite values.

    BINARY decodes to +1/-1 per dimension.
    """
    dim = vector.dim
    if dim == 0:
        raise InvalidArgument("is 0; give the number of dimensions", field=f"{field}.dim")
    if vector.dtype == pb.DTYPE_BINARY:
        expected = (dim + 7) // 8
    elif vector.dtype in _ITEM_BYTES or vector.dtype == pb.DTYPE_UNSPECIFIED:
        expected = dim * _ITEM_BYTES.get(vector.dtype, 4)
    else:
        raise InvalidArgument(f"{field}.dtype={vector.dtype} is not a known DType")
    if len(vector.data) != expected:
        raise InvalidArgument(
            f"has {len(vector.data)} bytes; dim={dim} of {pb.DType.Name(vector.dtype or pb.DTYPE_FLOAT32)} "
            f"needs {expected}",
            field=f"{field}.data",
        )
    if vector.dtype == pb.DTYPE_FLOAT16:
        values = np.frombuffer(vector.data, dtype="<f2").astype(np.float32)
    elif vector.dtype == pb.DTYPE_INT8:
        values = np.frombuffer(vector.data, dtype=np.int8).astype(np.float32) * vector.scale
    elif vector.dtype == pb.DTYPE_BINARY:
        bits = np.unpackbits(np.frombuffer(vector.data, dtype=np.uint8))[:dim]
        values = bits.astype(np.float32) * 2.0 - 1.0
    else:
        values = np.frombuffer(vector.data, dtype="<f4")
    if not np.all(np.isfinite(values)):
        raise InvalidArgument("holds NaN or infinite values", field=field)
    return values


def unit_vector(vector: pb.Vector, field: str) -> np.ndarray:
    """A finite, non-zero wire vector scaled to unit length (inner product is then cosine)."""
    values = from_wire(vector, field)
    norm = float(np.linalg.norm(values))
    if norm == 0.0:
        raise InvalidArgument("is all zeros; a zero vector has no direction to search by", field=field)
    return (values / norm).astype(np.float32)
