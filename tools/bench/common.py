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
    """columns: (key, header, format spec)."""
    widths = [max(len(h), *(len(format(r[k], f)) for r in rows)) for k, h, f in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for r in rows:
        print("  ".join(format(r[k], f).rjust(w) for (k, _, f), w in zip(columns, widths)))


def write_json(path: str | Path, name: str, rows: list[dict], **extra) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": rows,
        **extra,
    }
    path.write_text(json.dumps(record, indent=1))
    return path
