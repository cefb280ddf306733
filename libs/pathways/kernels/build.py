"""Building and registering the native CPU kernels (`*.cc` and `pool.h` beside this file).

The sources are compiled on first use with the machine's C++ compiler (`-O3 -march=native`)
into one shared library, cached by a hash of the sources, compiler, JAX version and CPU, and
registered with XLA as FFI targets, so jitted programs call them like any other op.

`PATHWAYS_KERNELS` picks the implementation:
  auto   (default) measured: on a CPU, the kernels are built and each shape class's work is
         timed against XLA's on this machine, once (the decision is cached beside the built
         library, and one process measures while others wait for it): GPT-2-sized transformer
         blocks one after another, a decode step's (1 and 8 rows, with the KV cache's write and
         attention) and a prefill chunk's (128 rows' matmuls). The kernels then
         compute the shapes where they were faster, XLA's ops the others; where neither shape
         gains (or no C++ compiler is found, or JAX computes on an accelerator) everything stays
         XLA's. Why measure: XLA's CPU dot costs twice as much for 8 rows as for one (the
         weights are repacked on every call), so batched decode steps only pay with the kernels,
         while on some CPUs the kernels lose on prefill;
  xla    XLA's own ops; the kernels are never built;
  native the native kernels for every shape, or an error saying why they cannot be built.
`PATHWAYS_KERNELS_MARCH=haswell` (any -march value) builds them for another instruction set than
this CPU's (to measure the AVX2 code on a CPU that also has AVX-512).
`PATHWAYS_AMX=off` keeps bfloat16-weight prefill in float32 arithmetic even where AMX tiles
exist (e.g. to get the same numbers on machines with and without AMX); default `auto`.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp

from pathways import backends

log = logging.getLogger(__name__)

MODES = backends.SETTINGS["PATHWAYS_KERNELS"]
# Shape classes a decision covers: matmuls of at most MAX_DECODE_ROWS rows (and a decode step's
# attention against the cache), and larger ones.
SHAPES = ("decode", "prefill")
MAX_DECODE_ROWS = 8
# FFI target name -> the handler symbol in the library
TARGETS = {
    "pathways_matmul_f32": "PathwaysMatmulF32",
    "pathways_matmul_bf16": "PathwaysMatmulBf16",
    "pathways_matmul_bf16_tiles": "PathwaysMatmulBf16Tiles",
    "pathways_attend_cached": "PathwaysAttendCached",
}
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]


def _flags() -> list[str]:
    """The compiler's flags; PATHWAYS_KERNELS_MARCH replaces -march=native (e.g. `haswell` to
    measure the AVX2 code on a CPU that also has AVX-512)."""
    march = os.environ.get("PATHWAYS_KERNELS_MARCH", "").strip()
    return [f"-march={march}" if f == "-march=native" and march else f for f in _FLAGS]


class KernelError(backends.BackendError):
    """The native kernels were required (PATHWAYS_KERNELS=native) but cannot be built or loaded,
    or a setting of theirs is not one they know."""


def _setting(name: str) -> str:
    try:
        return backends.setting(name)
    except backends.BackendError as e:  # as a KernelError: what callers of the kernels catch
        raise KernelError(str(e)) from None


def mode() -> str:
    return _setting("PATHWAYS_KERNELS")


def cache_dir() -> Path:
    """Where built kernels are kept: $PATHWAYS_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get("PATHWAYS_CACHE_DIR"):
        return Path(os.environ["PATHWAYS_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or (
        os.path.join(os.environ["HOME"], ".cache") if os.environ.get("HOME") else None
    )
    return Path(base or tempfile.gettempdir()) / "pathways" / "kernels"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    raise KernelError("no C++ compiler found (set CXX, or install g++ or clang++)")


def _cpu_id() -> str:
    """What -march=native depends on: the architecture and the CPU's feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags}"


def _sources() -> dict[str, bytes]:
    package = resources.files("pathways.kernels")
    return {
        f.name: f.read_bytes()
        for f in sorted(package.iterdir(), key=lambda f: f.name)
        if f.name.endswith((".cc", ".h"))
    }


def _build() -> Path:
    sources = _sources()
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join(
            x if isinstance(x, bytes) else x.encode()
            for x in (
                *sources.keys(),
                *sources.values(),
                cxx,
                version,
                jax.__version__,
                _cpu_id(),
                " ".join(_flags()),
            )
        )
    ).hexdigest()[:16]
    out_dir = cache_dir() / key
    lib = out_dir / "libpathways_kernels.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    # One process compiles; concurrent ones (module servers starting together) wait for it.
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return lib
        paths = []  # the .cc files compile; headers (pool.h) are copied beside them
        for name, text in sources.items():
            (out_dir / name).write_bytes(text)
            if name.endswith(".cc"):
                paths.append(str(out_dir / name))
        tmp = out_dir / f".build-{os.getpid()}.so"
        cmd = [cxx, *_flags(), "-I", jax.ffi.include_dir(), *paths, "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise KernelError(f"compiling {' '.join(paths)} failed: {' / '.join(tail)}")
        os.replace(tmp, lib)
    return lib


_lock = threading.RLock()  # re-entered: measuring the kernels (auto) calls them
_loaded: bool | None = None
_lib: ctypes.CDLL | None = None


def available() -> bool:
    """Builds and registers the native kernels once per process; whether they are used here for
    any shape (see `chosen` for which)."""
    global _loaded
    if _loaded is not None:  # decided: no lock (asked on every step)
        return _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded


def chosen(shape: str) -> bool:
    """Whether the kernels compute this shape class (`SHAPES`) here: all with
    PATHWAYS_KERNELS=native, none with xla, the measured ones with auto."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}; got {shape!r}")
    return available() and _chosen.get(shape, True)


_chosen: dict[str, bool] = {}  # auto's decision (absent while measuring: the kernels run)


def _load() -> bool:
    if mode() == "xla":
        return False
    global _loaded
    ok = _load_library()
    if ok and mode() == "auto":
        _loaded = True  # loaded: the measurement below may call the kernels
        _chosen.update(decide(_lib_path))
        ok = any(_chosen.values())
    return ok


_lib_path: Path | None = None
# What each shape class's probe runs (`_measure`): `layers` GPT-2-small-sized transformer blocks'
# matmuls one after another (each layer's input is the previous one's output, as in a model;
# independent matmuls could overlap on XLA's threads, which a model's chain cannot), over more
# weights than the caches hold (decode streams every weight from memory once per token). A
# decode step also writes and attends its rows' KV cache (native: the kernels' attention op;
# XLA: the scatter, window gather and attention the model's XLA path does), which the first
# probe left out; a prefill chunk's attention is XLA's either way, so not probed.
# `tools/bench/backend_choice.py` compares the probes' predictions with a model's times.
_D, _HEADS, _FF = 768, 12, 3072
_PROBE_WEIGHTS = {
    **{name: (_D, _D) for name in ("q", "k", "v", "o")},  # one matmul each, as the modules do
    "up": (_D, _FF),
    "down": (_FF, _D),
}
_PROBES = {"decode": ((1, 8), 6), "prefill": ((128,), 4)}  # shape -> (rows, layers)
_PROBE_WINDOW, _PROBE_CONTEXT = 256, 512  # cached positions attended to; the cache's length
_PROBE_REPEAT = 7  # alternated passes per side; the medians decide (one probe run: ~3 s)
_MARGIN = 1.1  # the kernels must be this much faster to be chosen
# Bumped when the probe changes: a decision cached by another probe is measured again.
# 1: independent 768x3072 matmuls (until 2026-12-07); 2: chained blocks with the cache step.
_PROBE_VERSION = 2


def decide(lib: Path | None, measure=None) -> dict[str, bool]:
    """For each shape class, whether the native kernels are faster than XLA here
    (PATHWAYS_KERNELS=auto): {shape: bool}.

    Measured once per built library (sources, compiler, CPU flags) and set of XLA flags, and
    cached beside the library (`_decision_path`); one process measures, others started meanwhile
    wait and read its decision. `measure() -> {shape: (native_s, xla_s)}` can be given (tests
    force a decision).
    """
    cached = _decision_path(lib) if lib is not None else None
    if measure is not None or cached is None:
        return _decide(measure or _measure, None)
    with open(lib.parent / ".decide.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            record = json.loads(cached.read_text())
            if record.get("probe") == _PROBE_VERSION:
                return {shape: bool(record["chosen"][shape]) for shape in SHAPES}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or an older format: measure
        return _decide(_measure, cached)


def _decision_path(lib: Path) -> Path:
    """decision.json beside the library, or, where XLA_FLAGS is set (they change what XLA's side
    of the probe runs: e.g. --xla_cpu_max_isa), decision-<hash of the flags>.json."""
    flags = os.environ.get("XLA_FLAGS", "").strip()
    if not flags:
        return lib.parent / "decision.json"
    return lib.parent / f"decision-{hashlib.sha256(flags.encode()).hexdigest()[:12]}.json"


def _decide(measure, cached: Path | None) -> dict[str, bool]:
    times = measure()
    decision = {}
    for shape in SHAPES:
        native_s, xla_s = times[shape]
        decision[shape] = use = native_s * _MARGIN < xla_s
        (log.info if use else log.warning)(
            "native kernels %s for %s-shaped matmuls: %.3f ms native vs %.3f ms XLA here",
            "chosen" if use else "not used (not faster here)",
            shape,
            native_s * 1e3,
            xla_s * 1e3,
        )
    if cached is not None:
        record = {
            "chosen": decision,
            "seconds": times,
            "margin": _MARGIN,
            "probe": _PROBE_VERSION,
            "xla_flags": os.environ.get("XLA_FLAGS", "").strip(),
        }
        cached.write_text(json.dumps(record))
    return decision


def _measure() -> dict[str, tuple[float, float]]:
    """Median seconds of one pass of each shape class's probe (`_PROBES`): {shape: (native,
    XLA)}, the two alternated.

    Runs eagerly even when the first use of the kernels is inside a trace (`kernels.matmul`
    called in a jitted function): there, calling the probe's programs would only stage them
    into the caller's program, and the probe would time the staging (~1 ms for both sides) and
    cache that as the machine's decision.
    """
    with jax.ensure_compile_time_eval():
        return _measure_eagerly()


def _measure_eagerly() -> dict[str, tuple[float, float]]:
    import statistics
    import time

    import numpy as np

    from pathways.kernels.attention import attend_cached
    from pathways.kernels.matmul import matmul, pack

    rng = np.random.default_rng(0)
    sides = {
        "native": (jax.jit(_probe_blocks(matmul, attend_cached), donate_argnames="cache"), pack),
        "xla": (
            jax.jit(_probe_blocks(lambda x, w, n: x @ w, _xla_attend), donate_argnames="cache"),
            lambda w: w,
        ),
    }
    out = {}
    for shape, (rows, n_layers) in _PROBES.items():
        decode = shape == "decode"
        weights = [
            {
                name: jax.device_put(rng.standard_normal(kn, np.float32) * 0.02)
                for name, kn in _PROBE_WEIGHTS.items()
            }
            for _ in range(n_layers)
        ]
        params = {
            side: [{k: prepare(w) for k, w in layer.items()} for layer in weights]
            for side, (_, prepare) in sides.items()
        }
        xs = [
            jax.device_put(rng.standard_normal((m, 1, _D) if decode else (1, m, _D), np.float32))
            for m in rows
        ]
        cache_shape = (n_layers, 8, _PROBE_CONTEXT, _HEADS, _D // _HEADS)
        caches = {side: [np.zeros(cache_shape, np.float32)] * 2 for side in sides}

        def one_pass(side: str, params=params, xs=xs, caches=caches, decode=decode) -> None:
            fn = sides[side][0]
            for x in xs:
                if not decode:
                    jax.block_until_ready(fn(x, params[side]))
                    continue
                m = x.shape[0]
                positions = np.full((m, 1), _PROBE_WINDOW - 1, np.int32)
                slots = np.arange(m, dtype=np.int32)
                _, *cache = fn(x, params[side], caches[side], positions, slots)
                caches[side] = jax.block_until_ready(cache)

        for side in sides:
            one_pass(side)  # compiled here, not timed
        times = {side: [] for side in sides}
        for _ in range(_PROBE_REPEAT):
            for side in sides:
                t0 = time.perf_counter()
                one_pass(side)
                times[side].append(time.perf_counter() - t0)
        out[shape] = (statistics.median(times["native"]), statistics.median(times["xla"]))
    return out


def _probe_blocks(mm, attend, window: int = _PROBE_WINDOW):
    """A chain of transformer blocks' work with matmul `mm(x, w, n)` and a decode step's cache
    attention `attend` over `window` positions (see `_PROBES`): (x, layers) -> x for a prefill
    chunk, (x, layers, cache, positions, slots) -> (x, *cache) for a decode step."""

    def run(x, layers, cache=None, positions=None, slots=None):
        for i, w in enumerate(layers):
            q, k, v = (mm(x, w[name], _D) for name in "qkv")
            if cache is None:  # prefill: attention is XLA's on both sides, not probed
                a = q + k + v
            else:
                b, t = x.shape[:2]
                q, k, v = (y.reshape(b, t, _HEADS, -1) for y in (q, k, v))
                a, *cache = attend(q, k, v, positions, slots, *cache, layer=i, window=window)
            x = x + mm(a, w["o"], _D)
            x = x + mm(jax.nn.gelu(mm(x, w["up"], _FF)), w["down"], _D)
        return x if cache is None else (x, *cache)

    return run


def _xla_attend(q, k, v, positions, slots, ck, cv, *, layer: int, window: int):
    """A decode step's attention as the model's XLA path computes it: the cache write, the
    window's gather, a masked softmax over it."""
    ck = ck.at[layer, slots[:, None], positions].set(k, mode="drop")
    cv = cv.at[layer, slots[:, None], positions].set(v, mode="drop")
    k_ctx, v_ctx = ck[layer, slots, :window], cv[layer, slots, :window]  # (B, W, N, H)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k_ctx) / jnp.sqrt(jnp.float32(q.shape[-1]))
    mask = jnp.arange(window)[None, None, None, :] <= positions[:, None, :, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
    out = jnp.einsum("bnts,bsnh->btnh", probs, v_ctx)
    return out.reshape(*q.shape[:2], -1), ck, cv


def _load_library() -> bool:
    if jax.default_backend() != "cpu":
        # CPU kernels: on an accelerator, programs stay XLA's (they run on the device).
        log.info("native CPU kernels not used: JAX computes on %s", jax.default_backend())
        return False
    global _lib, _lib_path
    try:
        _lib_path = _build()
        lib = ctypes.cdll.LoadLibrary(str(_lib_path))
        for target, symbol in TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
        _lib = lib
    except (KernelError, OSError, AttributeError) as e:
        if mode() == "native":
            raise KernelError(f"PATHWAYS_KERNELS=native: {e}") from e
        log.warning("native kernels unavailable (%s); using XLA's ops", e)
        return False
    return True


AMX_MODES = backends.SETTINGS["PATHWAYS_AMX"]


def amx_mode() -> str:
    return _setting("PATHWAYS_AMX")


def tiles_available() -> bool:
    """Whether bfloat16 prefill matmuls run on AMX tiles here (x86-64 with AMX-BF16, and an OS
    that grants the tile state, and not PATHWAYS_AMX=off); elsewhere they take the
    float32-arithmetic path."""
    return amx_mode() == "auto" and available() and bool(_lib.pathways_tiles_ready())
