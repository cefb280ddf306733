"""How many threads XLA's CPU backend computes with.

XLA sizes its CPU thread pools once, when JAX creates its CPU client, from the CPUs the process may
run on (its affinity mask). `--xla_cpu_multi_thread_eigen=false` does not make it single-threaded:
dots and partitioned loops still run on the pool, so every process of a local deployment would
start as many compute threads as the machine has cores. Four module servers on two cores then
fight over them: measured here, one micro-batch's forward + backward through the tiny pathway
took 46 ms of CPU for 29 ms of wall time with the default pool, against 31 ms / 31 ms with one
thread.

`limit_threads(n)` makes the pool n threads wide without pinning the process: it narrows the
affinity mask to n CPUs, creates the client, then gives every thread of the process the full mask
back (threads started while narrowed inherited the narrow mask; a mask is per thread on Linux).

`configure_dispatch()` (run when `pathways.runtime` is imported, and by `limit_threads`) sets
JAX's CPU dispatch from `PATHWAYS_CPU_DISPATCH`: `async` (JAX's own, the default) runs each
computation on a thread of JAX's; `sync` runs it on the thread that calls it. A decode step's
caller waits for its token before the next step, so async dispatch costs a cross-CPU wake-up per
step and overlaps nothing there; but run inline, a program's independent ops run one after
another, which costs the larger steps. Measured on a 2-vCPU AMD EPYC (A/B, 5 runs per side, BENCHMARKS.md):
sync made the tiny spec's decode 1.26x faster and its prefill 0.86x; GPT-2 small decode 0.99x,
prefill 0.95x; through module servers 1.00-1.06x. So it is opt-in, for small models' decode.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

DISPATCH_ENV = "PATHWAYS_CPU_DISPATCH"
DISPATCH_MODES = ("sync", "async")


def configure_dispatch() -> str:
    """Sets JAX's CPU dispatch where PATHWAYS_CPU_DISPATCH asks (`sync`: a computation runs on
    the thread that calls it; `async`: on a thread of JAX's, JAX's default); unset, JAX's own
    setting stays. Returns the mode in effect. It applies when JAX creates its CPU client: a
    process's first computation."""
    import jax

    mode = os.environ.get(DISPATCH_ENV, "").strip().lower()
    if mode and mode not in DISPATCH_MODES:
        log.warning(
            "%s=%r is not one of %s: JAX's setting stays",
            DISPATCH_ENV,
            mode,
            ", ".join(DISPATCH_MODES),
        )
    elif mode:
        jax.config.update("jax_cpu_enable_async_dispatch", mode == "async")
    return "async" if jax.config.read("jax_cpu_enable_async_dispatch") else "sync"


def backend_started() -> bool:
    """Whether JAX has created its backends (after which the pool size is fixed)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without the module: assume not
        return False
    return bool(getattr(xla_bridge, "_backends", None))


def limit_threads(n: int) -> int:
    """Creates JAX's CPU backend with an `n`-thread compute pool; returns the pool size used.

    Call before the process's first JAX computation. n <= 0, or n at least the CPUs available,
    leaves XLA's default (one thread per available CPU).
    """
    if not hasattr(os, "sched_setaffinity"):
        log.warning("cpu threads: no sched_setaffinity on this platform; XLA picks its own")
        return 0
    allowed = sorted(os.sched_getaffinity(0))
    configure_dispatch()  # before the client exists: it reads the setting once
    if n <= 0 or n >= len(allowed):
        return len(allowed)
    if backend_started():
        raise RuntimeError(
            "cpu threads must be set before JAX's first computation (its CPU backend already "
            "exists with its own thread pool)"
        )
    import jax

    os.sched_setaffinity(0, allowed[:n])
    try:
        jax.devices()  # creates the CPU client and its pools while the mask is narrow
    finally:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), allowed)
            except OSError:  # a thread that exited meanwhile
                pass
    return n


def thread_affinities() -> dict[str, set[int]]:
    """Thread name -> CPUs for every thread of this process (diagnostics and tests)."""
    out: dict[str, set[int]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            out[f"{name}:{tid}"] = os.sched_getaffinity(int(tid))
        except OSError:
            pass
    return out


def release_free_memory() -> None:
    """Gives freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Freed buffers below glibc's mmap threshold (up to 32 MB, e.g. a layer's weights) stay in the
    heap: a module server that drops a copy of its weights would keep its resident size.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
