"""Tests of the Tensor codec: round trips per dtype and validation messages."""

import jax.numpy as jnp
import numpy as np
import pytest

from pathways import codec
from pathways.v1 import tensor_pb2


def test_float32_and_int32_round_trip_exactly():
    x = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    t = codec.encode(x)
    assert t.dtype == tensor_pb2.DType.DTYPE_FLOAT32 and list(t.shape) == [3, 5, 7]
    np.testing.assert_array_equal(codec.decode(t), x)
    ids = np.arange(11, dtype=np.int64).reshape(1, 11)
    back = codec.decode(codec.encode(ids))
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, ids)


def test_jax_arrays_and_bytes_are_little_endian():
    t = codec.encode(jnp.array([1.0, 2.0], jnp.float32))
    assert t.data == np.array([1.0, 2.0], "<f4").tobytes()


def test_bfloat16_halves_bytes_and_matches_ml_dtypes_rounding():
    x = np.random.default_rng(1).standard_normal((2, 13)).astype(np.float32)
    t = codec.encode(x, "bfloat16")
    assert len(t.data) == 2 * x.size
    expect = x.astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(codec.decode(t), expect)


def test_int8_block_error_is_bounded_by_half_a_step():
    x = np.random.default_rng(2).standard_normal((3, 1, 130)).astype(np.float32)
    t = codec.encode(x, "int8", block_size=64)
    assert len(t.data) == x.size and len(t.scales) == 4 * 3 * 3  # ceil(130 / 64) == 3 blocks
    back = codec.decode(t)
    q, scales = codec.quantize_int8(x, 64)
    step = np.repeat(scales, 64, axis=-1)[..., :130]
    assert np.all(np.abs(back - x) <= step / 2 + 1e-6)


def test_int8_all_zero_block():
    np.testing.assert_array_equal(
        codec.decode(codec.encode(np.zeros((2, 5)), "int8", 4)), np.zeros((2, 5), np.float32)
    )


def test_wrong_byte_length_names_field_dtype_shape_and_length():
    t = codec.encode(np.zeros((2, 3), np.float32))
    t.data = t.data[:-1]
    with pytest.raises(
        codec.CodecError,
        match=r"input\.data has 23 bytes but dtype float32 and " r"shape \[2, 3\] need 24",
    ):
        codec.decode(t, "input")


def test_missing_dtype_and_bad_scales_are_rejected():
    with pytest.raises(codec.CodecError, match="x.dtype must be one of"):
        codec.decode(tensor_pb2.Tensor(shape=[1], data=b"\0\0\0\0"), "x")
    t = codec.encode(np.ones((2, 8)), "int8", 4)
    t.scales = t.scales[:4]
    with pytest.raises(codec.CodecError, match="x.scales has 4 bytes"):
        codec.decode(t, "x")
    with pytest.raises(codec.CodecError, match="dtype must be one of"):
        codec.encode(np.ones(2), "float16")


def test_int8_block_size_from_the_wire_is_bounded_and_never_expanded_past_the_axis():
    t = codec.encode(np.array([[0.5, -1.0, 0.25]], np.float32), "int8", block_size=4)
    t.block_size = codec.MAX_BLOCK  # one block covers the 3 values, as 4 did
    np.testing.assert_allclose(codec.decode(t), [[0.5, -1.0, 0.25]], atol=1 / 127)
    t.block_size = 1 << 30  # a 191-byte message once made a server allocate 1 GB this way
    with pytest.raises(codec.CodecError, match=r"block_size must be in \[1, 65536\]"):
        codec.decode(t, "input")


def test_an_empty_tensor_with_sizes_numpy_cannot_index_is_a_codec_error():
    """Found by tools/bench/fuzz.py: a ValueError from numpy came back as INTERNAL."""
    for dtype in (tensor_pb2.DType.DTYPE_FLOAT32, tensor_pb2.DType.DTYPE_INT8_BLOCK):
        t = tensor_pb2.Tensor(dtype=dtype, shape=[11778206] * 3 + [0], block_size=3)
        with pytest.raises(codec.CodecError, match=r"input.shape \[11778206, .*cannot be an"):
            codec.decode(t, "input")
