"""How a serving module stores its weights: float32, bfloat16 or int8 (memory per module is a choice).

Training, checkpoints and the float32 `state` of a runtime never change; this is the copy that
sessions compute with (`ModuleRuntime.serving_state`), on the default (XLA) backend:

    float32    as trained.
    bfloat16   every linear kernel and the token embedding table held as bfloat16: half the
               bytes. Products still run in float32 (the kernel is widened inside the step).
    int8       every linear kernel as int8 with one float32 scale per output column (symmetric,
               scale = max |w| / 127 of the column), about a quarter of the bytes; the token
               table as bfloat16. y = (x @ q) * scale, so the scale costs one multiply per output.

An int8 kernel stays one array, so a module's parameter tree keeps its shape: (K + 4, N) int8,
whose last 4 rows are the column scales' float32 bytes. Inside a jitted step `matmul` multiplies
by a stored kernel and `lookup` gathers rows of a stored table; `dense_kernel` reads a kernel back
as float32 (lossy for bfloat16/int8).
Nothing here is device-specific: the same arrays serve on CPU, GPU and TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STORAGE = ("float32", "bfloat16", "int8")
_SCALE_ROWS = 4  # a float32 scale is 4 int8 bytes


def check(weights: str) -> None:
    if weights not in STORAGE:
        raise ValueError(f"weights must be one of {', '.join(STORAGE)}; got {weights!r}")


def _key(p) -> str:
    return str(getattr(p, "key", getattr(p, "name", p)))


def _keys(path) -> list[str]:
    """A parameter's path as names, without the Variable's own `.value` (nnx.State leaves)."""
    keys = [_key(p) for p in path]
    return keys[:-1] if keys[-1:] == ["value"] else keys


def _is_linear_kernel(path, x) -> bool:
    return getattr(x, "ndim", 0) == 2 and _keys(path)[-1:] == ["kernel"]


def _is_token_table(path, x) -> bool:
    return getattr(x, "ndim", 0) == 2 and _keys(path)[-2:] == ["tokens", "embedding"]


def quantize_int8(kernel_kn) -> jax.Array:
    """(K, N) float -> (K + 4, N) int8: per-column symmetric int8 values, then the scales' bytes."""
    w = jnp.asarray(kernel_kn, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=0) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    scale_bytes = jax.lax.bitcast_convert_type(scale, jnp.int8)  # (N, 4)
    return jnp.concatenate([q, scale_bytes.T], axis=0)


def _split_int8(kernel):
    q = kernel[:-_SCALE_ROWS]
    scale = jax.lax.bitcast_convert_type(kernel[-_SCALE_ROWS:].T, jnp.float32)  # (N,)
    return q, scale


def store(state, weights: str):
    """A module's parameters (a pytree, e.g. an nnx.State) as `weights` stores them."""
    check(weights)
    if weights == "float32":
        return state
    return jax.tree_util.tree_map_with_path(lambda p, x: store_leaf(p, x, weights), state)


def store_leaf(path, x, weights: str):
    """One parameter (`path`: its key path in the module's tree) as `weights` stores it: what
    `store` does to each leaf, for callers converting a tree array by array."""
    if weights == "float32":
        return x
    if _is_linear_kernel(path, x):
        if weights == "int8":
            return quantize_int8(x)
        return jnp.asarray(x).astype(jnp.bfloat16)
    if _is_token_table(path, x):
        return jnp.asarray(x).astype(jnp.bfloat16)
    return x


def restore(serving, template):
    """The inverse of `store` as float32 (exact for float32; bfloat16/int8 give back what they
    hold, not the original). `template`: the original tree of shapes."""

    def back(x, t):
        if getattr(x, "dtype", None) == jnp.int8 and x.shape[0] == t.shape[0] + _SCALE_ROWS:
            return dense_kernel(x)
        if getattr(x, "dtype", None) == jnp.bfloat16:
            return x.astype(jnp.float32)
        return x

    return jax.tree.map(back, serving, template)


def dense_kernel(kernel) -> jax.Array:
    """A stored (K, N) kernel as float32."""
    if kernel.dtype == jnp.int8:
        q, scale = _split_int8(kernel)
        return q.astype(jnp.float32) * scale[None, :]
    return kernel.astype(jnp.float32)


def matmul(x, kernel) -> jax.Array:
    """x (..., K) float32 @ a stored (K, N) kernel -> (..., N) float32.

    A bfloat16 or int8 kernel is widened 64 rows at a time inside a loop (`lax.scan`), so the
    step never holds a float32 copy of the whole kernel: converting a whole (768, 50257) head
    first took 14x the float32 product on XLA:CPU (a fresh 150 MB buffer per call), the loop
    about the same time as it (`tools/bench/weights.py`)."""
    if kernel.dtype == jnp.float32:
        return jnp.matmul(x, kernel)
    scale = None
    if kernel.dtype == jnp.int8:
        kernel, scale = _split_int8(kernel)
    k, n = kernel.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    c = _chunk(k)
    xs = x2.reshape(x2.shape[0], k // c, c).transpose(1, 0, 2)  # (chunks, M, c)
    ks = kernel.reshape(k // c, c, n)

    def body(acc, xk):
        xi, ki = xk
        return acc + jnp.matmul(xi, ki.astype(jnp.float32)), None

    y, _ = jax.lax.scan(body, jnp.zeros((x2.shape[0], n), jnp.float32), (xs, ks))
    if scale is not None:
        y = y * scale
    return y.reshape(*lead, n)


def _chunk(k: int, most: int = 64) -> int:
    """The largest divisor of k that is at most `most` (rows widened per loop iteration)."""
    return next(c for c in range(min(k, most), 0, -1) if k % c == 0)


def lookup(stored_table, ids) -> jax.Array:
    """Rows `ids` of a stored embedding table, as float32 (only those rows are widened)."""
    rows = jnp.take(stored_table, ids, axis=0)
    return rows if rows.dtype == jnp.float32 else rows.astype(jnp.float32)


def nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))
