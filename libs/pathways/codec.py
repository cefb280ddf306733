"""numpy/JAX arrays <-> `pathways.v1.Tensor`: float32, bfloat16, int32 and block-scaled int8."""

from __future__ import annotations

import math

import numpy as np

# jax's bfloat16 is ml_dtypes.bfloat16 (a numpy dtype); importing it through jax keeps the
# dependency on a declared requirement.
from jax.numpy import bfloat16

from pathways.v1 import tensor_pb2

DType = tensor_pb2.DType
NAMES = {
    DType.DTYPE_FLOAT32: "float32",
    DType.DTYPE_BFLOAT16: "bfloat16",
    DType.DTYPE_INT32: "int32",
    DType.DTYPE_INT8_BLOCK: "int8",
}
BY_NAME = {v: k for k, v in NAMES.items()}
_NUMPY = {
    DType.DTYPE_FLOAT32: np.dtype("<f4"),
    DType.DTYPE_BFLOAT16: np.dtype(bfloat16),
    DType.DTYPE_INT32: np.dtype("<i4"),
    DType.DTYPE_INT8_BLOCK: np.dtype("i1"),
}
DEFAULT_BLOCK = 64
# Largest int8 block accepted from the wire. Decoding must not allocate more than the message
# carries: a block is never expanded beyond the tensor's last axis, and this bounds the field.
MAX_BLOCK = 1 << 16


class CodecError(ValueError):
    """A Tensor whose dtype, shape or byte length is inconsistent; the message names them."""


def dtype_of(name: str | int) -> int:
    """Parses "float32"/"bfloat16"/"int32"/"int8" (or an enum value) into a DType."""
    if isinstance(name, int) and name in NAMES:
        return name
    if name in BY_NAME:
        return BY_NAME[name]
    raise CodecError(f"dtype must be one of {', '.join(BY_NAME)}; got {name!r}")


def encode(
    array,
    dtype: str | int | None = None,
    block_size: int = DEFAULT_BLOCK,
    out: tensor_pb2.Tensor | None = None,
) -> tensor_pb2.Tensor:
    """Encodes an array; `dtype` None keeps int32 for integers and float32 for floats.

    Args:
        array: numpy or JAX array (anything np.asarray takes).
        dtype: wire element type ("float32", "bfloat16", "int32", "int8" or a DType).
        block_size: int8 only, elements per scale along the last axis.
        out: a message to fill in place (e.g. a field of a response), else a new one.
    """
    a = np.asarray(array)
    if dtype is None:
        dt = DType.DTYPE_INT32 if a.dtype.kind in "iu" else DType.DTYPE_FLOAT32
    else:
        dt = dtype_of(dtype)
    t = out if out is not None else tensor_pb2.Tensor()
    t.dtype = dt
    t.shape[:] = a.shape
    if dt == DType.DTYPE_INT8_BLOCK:
        q, scales = quantize_int8(a, block_size)
        t.data, t.scales, t.block_size = q.tobytes(), scales.astype("<f4").tobytes(), block_size
    else:
        t.data = np.ascontiguousarray(a, dtype=_NUMPY[dt]).tobytes()
    return t


def decode(t: tensor_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """Decodes a Tensor to numpy (bfloat16 and int8 come back as float32).

    Raises:
        CodecError: naming `field`, its dtype, shape and byte length when they disagree.
    """
    dt = t.dtype
    np_dtype = _NUMPY.get(dt)
    if np_dtype is None:
        raise CodecError(
            f"{field}.dtype must be one of {', '.join(BY_NAME)}; "
            f"got {DType.Name(dt) if dt in DType.values() else dt}"
        )
    shape = tuple(t.shape)
    if shape and min(shape) < 0:
        raise CodecError(f"{field}.shape must not have negative sizes; got {list(shape)}")
    data = t.data  # each read of a bytes field makes a new copy: read it once
    want = math.prod(shape) * np_dtype.itemsize
    if len(data) != want:
        raise CodecError(
            f"{field}.data has {len(data)} bytes but dtype {NAMES[dt]} and "
            f"shape {list(shape)} need {want}"
        )
    try:
        a = np.frombuffer(data, np_dtype).reshape(shape)
    except ValueError as e:  # e.g. an empty tensor whose other sizes overflow numpy's index
        raise CodecError(f"{field}.shape {list(shape)} cannot be an array: {e}") from None
    if dt == DType.DTYPE_INT8_BLOCK:
        return _dequantize(a, t, field)
    if dt == DType.DTYPE_BFLOAT16:
        return a.astype(np.float32)
    return a


def quantize_int8(a: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-block int8: returns (int8 values like `a`, float32 scales (..., n_blocks))."""
    if block_size <= 0:
        raise CodecError(f"block_size must be > 0; got {block_size}")
    a = np.asarray(a, np.float32)
    if a.ndim == 0:
        a = a.reshape(1)
    last = a.shape[-1]
    nb = -(-last // block_size)
    padded = np.zeros(a.shape[:-1] + (nb * block_size,), np.float32)
    padded[..., :last] = a
    blocks = padded.reshape(a.shape[:-1] + (nb, block_size))
    scales = np.abs(blocks).max(-1) / 127.0
    safe = np.where(scales > 0, scales, 1.0)
    q = np.clip(np.rint(blocks / safe[..., None]), -127, 127).astype(np.int8)
    return q.reshape(padded.shape)[..., :last], scales.astype(np.float32)


def _dequantize(q: np.ndarray, t: tensor_pb2.Tensor, field: str) -> np.ndarray:
    if not 0 < t.block_size <= MAX_BLOCK:
        raise CodecError(
            f"{field}.block_size must be in [1, {MAX_BLOCK}] (MAX_BLOCK) for int8; "
            f"got {t.block_size}"
        )
    shape = q.shape if q.ndim else (1,)
    nb = -(-shape[-1] // t.block_size)
    n_scales = math.prod(shape[:-1]) * nb
    if len(t.scales) != 4 * n_scales:
        raise CodecError(
            f"{field}.scales has {len(t.scales)} bytes but shape {list(q.shape)} "
            f"with block_size {t.block_size} needs {4 * n_scales}"
        )
    scales = np.frombuffer(t.scales, "<f4").reshape(shape[:-1] + (nb,))
    # A block longer than the axis covers it once: never expand past the axis (no allocation
    # sized by the field alone).
    per_elem = np.repeat(scales, min(t.block_size, shape[-1]), axis=-1)[..., : shape[-1]]
    return (q.reshape(shape).astype(np.float32) * per_elem).reshape(q.shape)
