"""A native CPU matmul for decode steps: few rows against packed float32 or bfloat16 weights.

Serving paths pack each linear layer's kernel once (`pack_state`) and
`pathways.modules.layers.Dense` dispatches on the packed shape; see matmul.cc for why.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pathways.kernels.build import KernelError, amx_mode, available

PANEL = 32  # columns per packed panel (matmul.cc's kPanel)
WEIGHTS = ("float32", "bfloat16")
_TARGETS = {"float32": "pathways_matmul_f32", "bfloat16": "pathways_matmul_bf16"}


def check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}; got {weights!r}")


# ---- packing ---------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames="weights")
def pack(kernel_kn: jax.Array, weights: str = "float32") -> jax.Array:
    """(K, N) kernel -> (ceil(N / 32), K, 32) panels in `weights`' dtype, zero-padded columns."""
    k, n = kernel_kn.shape
    panels = -(-n // PANEL)
    padded = jnp.pad(kernel_kn, ((0, 0), (0, panels * PANEL - n)))
    return padded.reshape(k, panels, PANEL).transpose(1, 0, 2).astype(jnp.dtype(weights))


def unpack(packed: jax.Array, n: int) -> jax.Array:
    """The inverse of `pack` (as float32): for tests and for reading packed weights back."""
    panels, k, _ = packed.shape
    return packed.astype(jnp.float32).transpose(1, 0, 2).reshape(k, panels * PANEL)[:, :n]


def _is_kernel(path) -> bool:
    return any(getattr(p, "key", None) == "kernel" for p in path)


def pack_state(state, weights: str = "float32", native: bool | None = None):
    """A module's parameters for serving: every 2-D linear kernel packed for `matmul`.

    `native=None` uses the native kernel where `available()`; False keeps XLA's dot. Without
    it, kernels stay (K, N); bfloat16 weights are then rounded to bfloat16 and kept as float32,
    so both paths compute with the same weights.
    """
    check_weights(weights)
    native = available() if native is None else (native and available())
    return jax.tree_util.tree_map_with_path(lambda p, x: pack_leaf(p, x, weights, native), state)


def pack_leaf(path, x, weights: str, native: bool):
    """One parameter (`path`: its key path) as `pack_state` makes it, with `native` decided by
    the caller: for callers converting a tree array by array."""
    if not _is_kernel(path) or getattr(x, "ndim", 0) != 2:
        return x
    if native:
        return pack(x, weights)
    if weights == "bfloat16":
        return jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)
    return x


def unpack_state(serving, template):
    """The inverse of `pack_state` for float32 weights: `template` is the original state's tree
    of shapes (e.g. `jax.ShapeDtypeStruct`s); packed kernels come back bit-identical."""

    def restore(x, t):
        if getattr(x, "ndim", 0) == 3 and len(t.shape) == 2:
            return unpack(x, t.shape[1]).astype(t.dtype)
        return x

    return jax.tree.map(restore, serving, template)


# ---- the op ----------------------------------------------------------------------------------
def matmul(x: jax.Array, packed: jax.Array, n: int, *, tiles: bool = False) -> jax.Array:
    """x (..., K) float32 @ a packed (K, n) kernel -> (..., n) float32, inside or outside jit.

    `tiles=True` (prefill: many rows, compute-bound) lets bfloat16 weights multiply on AMX
    tiles where `tiles_available()` (not with PATHWAYS_AMX=off): x is rounded to bfloat16
    first, products accumulate in float32. Otherwise, and always for float32 weights or <= 8
    rows, x stays float32.
    """
    panels, k, width = packed.shape
    if width != PANEL or x.shape[-1] != k or panels != -(-n // PANEL):
        raise ValueError(
            f"matmul: x {tuple(x.shape)} does not fit packed weights {tuple(packed.shape)} "
            f"for {n} outputs"
        )
    if not available():
        raise KernelError("matmul on packed weights needs the native kernels (PATHWAYS_KERNELS)")
    weights = "bfloat16" if packed.dtype == jnp.bfloat16 else "float32"
    lead = x.shape[:-1]
    rows = int(np.prod(lead))
    if rows == 0:
        return jnp.zeros((*lead, n), jnp.float32)
    tiles = tiles and weights == "bfloat16" and amx_mode() == "auto"
    target = _TARGETS[weights] + ("_tiles" if tiles else "")
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, n), jnp.float32))
    y = call(x.reshape(rows, k).astype(jnp.float32), packed)
    return y.reshape(*lead, n)
