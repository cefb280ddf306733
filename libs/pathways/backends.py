"""The seam between model code and device-specific ops.

Model files (`pathways.modules`) compute with plain JAX, which XLA compiles for any device: that
is the default backend and always there. A few ops have optional faster implementations for one
kind of device (today: the native CPU kernels of `pathways.kernels`, for decode steps). Model
files reach those only through `op(name)` here, never by importing the backend; the backend
registers its ops when it is loaded, and the serving runtime (`pathways.runtime`) decides
whether to use it (`PATHWAYS_KERNELS`: explicit, or measured on the machine), so the model code
runs unchanged wherever that backend does not exist.

Ops:
  packed_matmul(x, packed, n, *, tiles) -> y     x (..., K) @ a kernel packed by the backend
  attend_cached(q, k, v, positions, slots, cache_k, cache_v, *, layer, window)
                                                 -> (out, cache_k, cache_v), a decode step's
                                                 cache write and attention in place
"""

from __future__ import annotations

from collections.abc import Callable

_OPS: dict[str, Callable] = {}


class BackendError(RuntimeError):
    """An op of an optional backend was asked for but no backend providing it is loaded."""


def register(name: str, fn: Callable) -> None:
    """Called by a backend when it loads: `fn` implements op `name`."""
    _OPS[name] = fn


def op(name: str) -> Callable:
    """The loaded implementation of op `name` (resolved while tracing, not per call)."""
    fn = _OPS.get(name)
    if fn is None:
        raise BackendError(
            f"op {name!r} belongs to an optional backend that is not loaded (the native CPU "
            f"kernels: PATHWAYS_KERNELS=auto or native); the default XLA path never calls it"
        )
    return fn
