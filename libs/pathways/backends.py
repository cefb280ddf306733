"""The seam between model code and device-specific ops.

Model files (`pathways.modules`) compute with plain JAX, which XLA compiles for any device: that
is the default backend and always there. A few ops have optional faster implementations for one
kind of device (today: the native CPU kernels of `pathways.kernels`, for decode steps). Model
files reach those only through this module, never by importing the backend: `optional(name)`
while a step is traced (None unless the runtime traces it `using` the backend), or `op(name)`
for weights the backend itself packed. The backend registers its ops when it is loaded, and the
serving runtime (`pathways.runtime`) decides whether to use it (`PATHWAYS_KERNELS`: explicit, or
measured on the machine), so the model code runs unchanged wherever that backend does not exist
and no kind's step takes a backend argument.

Ops:
  packed_matmul(x, packed, n, *, tiles) -> y     x (..., K) @ a kernel packed by the backend
  attend_cached(q, k, v, positions, slots, cache_k, cache_v, *, layer, window)
                                                 -> (out, cache_k, cache_v), a decode step's
                                                 cache write and attention in place
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator

_OPS: dict[str, Callable] = {}
# Whether the step being traced uses the loaded backend's ops (`using`); False: plain JAX.
_USING: contextvars.ContextVar[bool] = contextvars.ContextVar("pathways_backend", default=False)

# The backends' settings (environment variables) and their values, the default first:
# PATHWAYS_KERNELS whether the native CPU kernels are used, PATHWAYS_AMX whether their bfloat16
# prefill uses AMX tiles (`pathways.kernels.build` says how).
SETTINGS = {"PATHWAYS_KERNELS": ("auto", "xla", "native"), "PATHWAYS_AMX": ("auto", "off")}


class BackendError(RuntimeError):
    """A backend cannot be used as asked: its op is not loaded, its setting is not one it knows,
    or (`pathways.kernels.KernelError`) it was required and cannot be built."""


def setting(name: str) -> str:
    """The value of the backend setting `name` (one of `SETTINGS`), checked."""
    allowed = SETTINGS[name]
    value = os.environ.get(name, "").strip().lower() or allowed[0]
    if value not in allowed:
        raise BackendError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def check_settings() -> None:
    """Raises BackendError naming the first bad setting. No JAX is imported: entry points call
    it before anything runs, so a bad value is one line at start-up, not an error at the first
    step that reads it."""
    for name in SETTINGS:
        setting(name)


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


@contextlib.contextmanager
def using(backend: bool) -> Iterator[None]:
    """Traces the steps called inside with the loaded backend's ops (`backend`) or plain JAX.

    The runtime decides (per module and shape class, `pathways.runtime`) and enters this around
    the module's step inside its jitted function, so the choice is made while tracing and is
    part of what the program is compiled for (the runtime keys its programs by it); model code
    asks `optional` and never sees a flag."""
    token = _USING.set(backend)
    try:
        yield
    finally:
        _USING.reset(token)


def optional(name: str) -> Callable | None:
    """Op `name` of the loaded backend when the step being traced uses it (`using`), else None:
    the model computes it with plain JAX."""
    return op(name) if _USING.get() else None
