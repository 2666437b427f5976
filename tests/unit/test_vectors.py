"""Shaping model output into wire vectors (truncate, normalise, cast) and decoding them back."""

import math

import grpc
import numpy as np
import pytest
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument
from services.common.vectors import check_options, from_wire, shape, to_wire

RNG_SEED = 1234


def decode_f32(vector: pb.Vector) -> np.ndarray:
    return np.frombuffer(vector.data, dtype="<f4")


def random_rows(rows: int, dim: int) -> np.ndarray:
    return np.random.default_rng(RNG_SEED).normal(size=(rows, dim)).astype(np.float32)


# --- shape -----------------------------------------------------------------------------------------


def test_shape_defaults_to_l2_normalised_float32() -> None:
    raw = np.array([[3.0, 4.0], [0.0, -2.0]], dtype=np.float64)
    vectors = shape(raw, pb.EncodeOptions())
    assert len(vectors) == 2
    for vector in vectors:
        assert vector.dtype == pb.DTYPE_FLOAT32
        assert vector.dim == 2
        assert len(vector.data) == 2 * 4
    np.testing.assert_allclose(decode_f32(vectors[0]), [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(decode_f32(vectors[1]), [0.0, -1.0], rtol=1e-6)


def test_shape_normalizes_each_row_to_unit_length() -> None:
    raw = random_rows(5, 16) * 7.5
    for vector in shape(raw, pb.EncodeOptions()):
        assert np.linalg.norm(decode_f32(vector)) == pytest.approx(1.0, abs=1e-5)


def test_shape_explicit_normalize_true_matches_the_default() -> None:
    raw = random_rows(3, 8)
    default = shape(raw, pb.EncodeOptions())
    explicit = shape(raw, pb.EncodeOptions(normalize=True))
    assert [v.data for v in default] == [v.data for v in explicit]


def test_shape_leaves_a_zero_row_at_zero() -> None:
    (vector,) = shape(np.zeros((1, 4), dtype=np.float32), pb.EncodeOptions())
    values = decode_f32(vector)
    assert np.all(np.isfinite(values))
    assert np.all(values == 0.0)


def test_shape_normalize_false_keeps_raw_values() -> None:
    raw = np.array([[3.0, 4.0, -12.5], [0.25, 0.0, 100.0]], dtype=np.float32)
    vectors = shape(raw, pb.EncodeOptions(normalize=False))
    for vector, row in zip(vectors, raw, strict=True):
        np.testing.assert_array_equal(decode_f32(vector), row)


def test_shape_truncates_dimensions_before_normalising() -> None:
    raw = np.array([[1.0, 2.0, 2.0, 100.0, -50.0]], dtype=np.float32)
    (vector,) = shape(raw, pb.EncodeOptions(dimensions=3))
    assert vector.dim == 3
    assert len(vector.data) == 3 * 4
    # normalised over the kept 3 dimensions, not the full 5
    np.testing.assert_allclose(decode_f32(vector), [1 / 3, 2 / 3, 2 / 3], rtol=1e-6)


def test_shape_truncation_without_normalisation_keeps_the_prefix() -> None:
    raw = np.array([[1.0, 2.0, 2.0, 100.0]], dtype=np.float32)
    (vector,) = shape(raw, pb.EncodeOptions(dimensions=2, normalize=False))
    np.testing.assert_array_equal(decode_f32(vector), [1.0, 2.0])


def test_float16_round_trip_is_close() -> None:
    raw = random_rows(4, 32)
    expected = shape(raw, pb.EncodeOptions())
    vectors = shape(raw, pb.EncodeOptions(dtype=pb.DTYPE_FLOAT16))
    for vector, reference in zip(vectors, expected, strict=True):
        assert vector.dtype == pb.DTYPE_FLOAT16
        assert vector.dim == 32
        assert len(vector.data) == 32 * 2
        decoded = from_wire(vector)
        assert decoded.dtype == np.float32
        np.testing.assert_allclose(decoded, decode_f32(reference), atol=1e-3)


def test_int8_round_trip_within_one_percent_using_scale() -> None:
    raw = random_rows(4, 64)
    normalised = [decode_f32(v) for v in shape(raw, pb.EncodeOptions())]
    vectors = shape(raw, pb.EncodeOptions(dtype=pb.DTYPE_INT8))
    for vector, reference in zip(vectors, normalised, strict=True):
        assert vector.dtype == pb.DTYPE_INT8
        assert vector.dim == 64
        assert len(vector.data) == 64
        peak = float(np.max(np.abs(reference)))
        assert vector.scale == pytest.approx(peak / 127, rel=1e-5)
        # the largest component uses the full int8 range
        assert int(np.max(np.abs(np.frombuffer(vector.data, dtype=np.int8)))) == 127
        decoded = from_wire(vector)
        assert np.max(np.abs(decoded - reference)) <= 0.01 * peak
        assert np.linalg.norm(decoded - reference) <= 0.01 * np.linalg.norm(reference)


def test_int8_of_a_zero_vector_decodes_to_zeros() -> None:
    vector = to_wire(np.zeros(5, dtype=np.float32), pb.DTYPE_INT8)
    assert vector.scale == 1.0
    np.testing.assert_array_equal(from_wire(vector), np.zeros(5))


def test_binary_packs_signs_msb_first_in_ceil_dim_over_8_bytes() -> None:
    row = np.array([0.5, -1.0, 0.2, 0.0, -0.3, 1.0, 1.0, -1.0, 0.7, -0.1], dtype=np.float32)
    vector = to_wire(row, pb.DTYPE_BINARY)
    assert vector.dtype == pb.DTYPE_BINARY
    assert vector.dim == 10
    assert vector.data == bytes([0b10100110, 0b10000000])
    assert vector.data == np.packbits(row > 0).tobytes()
    np.testing.assert_array_equal(from_wire(vector), [1, -1, 1, -1, -1, 1, 1, -1, 1, -1])


@pytest.mark.parametrize("dim", [1, 7, 8, 9, 17, 64])
def test_binary_length_and_signs_through_shape(dim: int) -> None:
    raw = random_rows(2, dim)
    vectors = shape(raw, pb.EncodeOptions(dtype=pb.DTYPE_BINARY))
    for vector, row in zip(vectors, raw, strict=True):
        assert vector.dim == dim
        assert len(vector.data) == math.ceil(dim / 8)
        np.testing.assert_array_equal(from_wire(vector), np.where(row > 0, 1.0, -1.0))


def test_float32_and_unspecified_dtype_decode_the_same() -> None:
    row = np.array([1.5, -2.25, 3.0], dtype=np.float32)
    data = row.astype("<f4").tobytes()
    np.testing.assert_array_equal(from_wire(pb.Vector(data=data, dim=3, dtype=pb.DTYPE_FLOAT32)), row)
    np.testing.assert_array_equal(from_wire(pb.Vector(data=data, dim=3)), row)


# --- check_options -------------------------------------------------------------------------------


@pytest.mark.parametrize("dimensions", [0, 1, 256])
def test_check_options_accepts_dimensions_up_to_the_model_dimension(dimensions: int) -> None:
    check_options(pb.EncodeOptions(dimensions=dimensions), 256, "text-small")


@pytest.mark.parametrize("dtype", list(pb.DType.values()))
def test_check_options_accepts_every_known_dtype(dtype: int) -> None:
    check_options(pb.EncodeOptions(dtype=dtype), 256, "text-small")


def test_check_options_refuses_dimensions_above_the_model_dimension() -> None:
    with pytest.raises(InvalidArgument) as error:
        check_options(pb.EncodeOptions(dimensions=257), 256, "text-small")
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "options.dimensions" in error.value.message
    assert "257" in error.value.message
    assert "256" in error.value.message
    assert "text-small" in error.value.message


def test_check_options_refuses_an_unknown_dtype() -> None:
    with pytest.raises(InvalidArgument) as error:
        check_options(pb.EncodeOptions(dtype=9), 256, "text-small")
    assert "options.dtype" in error.value.message
    assert "9" in error.value.message


# --- from_wire refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "dim", "length"),
    [
        (pb.DTYPE_FLOAT32, 3, 8),
        (pb.DTYPE_FLOAT32, 3, 16),
        (pb.DTYPE_UNSPECIFIED, 2, 4),
        (pb.DTYPE_FLOAT16, 4, 4),
        (pb.DTYPE_INT8, 5, 4),
        (pb.DTYPE_BINARY, 9, 1),
        (pb.DTYPE_BINARY, 8, 2),
    ],
)
def test_from_wire_refuses_a_wrong_byte_length(dtype: int, dim: int, length: int) -> None:
    vector = pb.Vector(data=b"\x01" * length, dim=dim, dtype=dtype, scale=1.0)
    with pytest.raises(InvalidArgument) as error:
        from_wire(vector, "queries[2]")
    assert "queries[2].data" in error.value.message
    assert f"{length} bytes" in error.value.message


def test_from_wire_refuses_dim_zero() -> None:
    with pytest.raises(InvalidArgument) as error:
        from_wire(pb.Vector(data=b"", dim=0, dtype=pb.DTYPE_FLOAT32))
    assert "vector.dim" in error.value.message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16])
def test_from_wire_refuses_non_finite_values(bad: float, dtype: int) -> None:
    code = "<f4" if dtype == pb.DTYPE_FLOAT32 else "<f2"
    data = np.array([0.5, bad, 1.0], dtype=code).tobytes()
    with pytest.raises(InvalidArgument) as error:
        from_wire(pb.Vector(data=data, dim=3, dtype=dtype))
    assert "NaN or infinite" in error.value.message


def test_from_wire_refuses_an_unknown_dtype() -> None:
    with pytest.raises(InvalidArgument) as error:
        from_wire(pb.Vector(data=b"\0" * 4, dim=4, dtype=9), "query")
    assert "query.dtype" in error.value.message
