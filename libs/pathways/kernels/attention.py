"""Attention against the slot-addressed KV cache in one native op (see attention.cc)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pathways.kernels.build import KernelError, available


def attend_cached(q, k, v, positions, slots, cache_k, cache_v, *, layer: int, window: int):
    """Writes this chunk's k/v into the caches' `layer` and attends q to each row's window.

    q (B, T, N, H), k and v (B, T, K, H) float32; positions (B, T) int32 (>= T_max: padding,
    not written); slots (B,) int32; caches (L, S, T_max, K, H) float32, updated in place.
    Returns (out (B, T, N * H), cache_k, cache_v): `attend` of `pathways.modules.layers` over
    the keys at positions < window and <= the query's position.
    """
    if not available():
        raise KernelError("attend_cached needs the native kernels (PATHWAYS_KERNELS)")
    b, t, n, h = q.shape
    call = jax.ffi.ffi_call(
        "pathways_attend_cached",
        (
            jax.ShapeDtypeStruct(q.shape, jnp.float32),
            jax.ShapeDtypeStruct(cache_k.shape, jnp.float32),
            jax.ShapeDtypeStruct(cache_v.shape, jnp.float32),
        ),
        input_output_aliases={5: 1, 6: 2},
    )
    f32 = jnp.float32
    out, cache_k, cache_v = call(
        q.astype(f32),
        k.astype(f32),
        v.astype(f32),
        positions.astype(jnp.int32),
        slots.astype(jnp.int32),
        cache_k,
        cache_v,
        layer=int(layer),
        window=int(window),
    )
    return out.reshape(b, t, n * h), cache_k, cache_v
