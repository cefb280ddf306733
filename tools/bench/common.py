"""Shared benchmark plumbing: timing, a printed table and a JSON record."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path


def timed(fn, repeat: int) -> list[float]:
    """Wall-clock seconds of `repeat` calls of fn (fn must block until its result is ready)."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); a missing or None value shows as "-"."""

    def cell(r, k, f):
        return "-" if r.get(k) is None else format(r[k], f)

    widths = [max(len(h), *(len(cell(r, k, f)) for r in rows)) for k, h, f in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for r in rows:
        print("  ".join(cell(r, k, f).rjust(w) for (k, _, f), w in zip(columns, widths)))


def dated_path(directory: str | Path, name: str) -> Path:
    """directory/name_YYYY-MM-DDTHHMM.json: a new record per run (tables cite their file)."""
    return Path(directory) / f"{name}_{time.strftime('%Y-%m-%dT%H%M', time.gmtime())}.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The instruction-set features a CPU result depends on (matmul code paths, XLA's and the kernels').
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_isa() -> dict:
    """The CPU's family/model numbers and which of `ISA_FLAGS` it has ("AMD EPYC" alone does not
    say Zen 2 (AVX2 only) from Zen 5 (AVX-512)); {} where /proc/cpuinfo is not there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if not key:
            break  # the first processor's block only
        fields.setdefault(key, value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "vendor": fields.get("vendor_id", ""),
        "family": fields.get("cpu family", ""),
        "model": fields.get("model", ""),
        "flags": [f for f in ISA_FLAGS if f in flags],
    }


def machine() -> dict:
    """What a result depends on: CPU model and count, JAX backend and devices, kernel choice."""
    import jax

    from pathways import kernels

    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_isa": cpu_isa(),
        "platform": platform.platform(),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "kernels": kernels.mode(),  # PATHWAYS_KERNELS: auto (default), xla or native
        # The shape classes the native kernels compute here (auto: as measured).
        "kernels_chosen": {shape: kernels.chosen(shape) for shape in kernels.SHAPES},
        # JAX's CPU dispatch (PATHWAYS_CPU_DISPATCH=sync or async; unset: JAX's, async)
        "cpu_async_dispatch": bool(jax.config.read("jax_cpu_enable_async_dispatch")),
        # What else changes the code that runs: XLA's flags (e.g. --xla_cpu_max_isa=AVX2) and
        # the instruction set the kernels are built for (PATHWAYS_KERNELS_MARCH).
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "kernels_march": os.environ.get("PATHWAYS_KERNELS_MARCH", "native"),
    }


def relative(value):
    """Paths under the repository recorded relative to it (records never hold machine paths)."""
    root = Path(__file__).resolve().parents[2]
    if isinstance(value, str) and value.startswith(str(root) + os.sep):
        return os.path.relpath(value, root)
    if isinstance(value, list):
        return [relative(v) for v in value]
    if isinstance(value, dict):
        return {k: relative(v) for k, v in value.items()}
    return value


def write_json(path: str | Path, name: str, rows: list[dict], **extra) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "rows": rows,
        **relative(extra),
    }
    path.write_text(json.dumps(record, indent=1))
    return path


def save_record(out: str | None, name: str, rows: list[dict], **extra) -> Path:
    """write_json to `out`, or to a dated file in tools/bench/results when None; says where."""
    root = Path(__file__).resolve().parents[2]
    path = Path(out) if out else dated_path(root / "tools/bench/results", name)
    write_json(path, name, rows, **extra)
    print(f"wrote {os.path.relpath(path, root) if path.is_absolute() else path}")
    return path
