"""A decode step's matmuls for 1 to 8 sessions' rows: the kernels' packed matmul against XLA's dot.

Times GPT-2 small's 12 layers of matmuls (q/k/v 768x2304, o 768x768, up 768x3072, down
3072x768), chained as in a model (each takes the previous one's output), jitted, for 1, 2, 3, 4,
6 and 8 rows (`--rows`), with float32 and bfloat16 weights (XLA's side computes with the same weights
rounded and kept in float32, as the serving path does), alternated in one process. A batched
decode step reads the same weights as one session's: "cost vs 1 row" says what the extra rows
add. Prints a table and writes JSON.

    PYTHONPATH=libs:.:build/gen python -m tools.bench.decode_rows

`XLA_FLAGS=--xla_cpu_max_isa=AVX2 PATHWAYS_KERNELS_MARCH=haswell` (and a separate
PATHWAYS_CACHE_DIR) builds the kernels for AVX2 on a CPU that also has AVX-512; XLA's dots still
run AVX-512 there (the flag caps XLA's generated code, not its GEMM library), so XLA's side is
faster than on an AVX2-only CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("PATHWAYS_KERNELS", "native")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pathways import kernels  # noqa: E402
from tools.bench.common import print_table, save_record  # noqa: E402

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # one layer's (K, N)
LAYERS = 12


def chain(mm):
    """jit of x (M, 768) through every layer's matmuls with `mm(x, w, n)`."""

    def run(x, layers):
        for layer in layers:
            h = x
            for (k, n), w in zip(SHAPES, layer, strict=True):
                h = mm(h[:, :k], w, n)
            x = x + h
        return x

    return jax.jit(run)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=15, help="alternated passes per side")
    ap.add_argument(
        "--rows", default="1,2,3,4,6,8", help="row counts, comma-separated (decode: up to 8)"
    )
    ap.add_argument("--json", default=None, help="record (default: a dated file in results/)")
    args = ap.parse_args(argv)
    try:
        row_counts = [int(r) for r in args.rows.split(",")]
    except ValueError:
        ap.error(f"--rows must be integers separated by commas; got {args.rows!r}")
    if 1 not in row_counts or min(row_counts) < 1:
        ap.error(f"--rows must include 1 (the ratios' base) and be >= 1; got {args.rows!r}")
    if kernels.mode() != "native" or not kernels.available():
        print("decode_rows: the native kernels must build here (PATHWAYS_KERNELS=native)")
        return 2
    rng = np.random.default_rng(0)
    weights = [[rng.standard_normal(kn, np.float32) * 0.03 for kn in SHAPES] for _ in range(LAYERS)]
    sides = {"native": chain(kernels.matmul), "xla": chain(lambda x, w, n: x @ w)}
    rows = []
    for dtype in kernels.WEIGHTS:
        params = {
            "native": [[kernels.pack(w, dtype) for w in layer] for layer in weights],
            "xla": [
                [jnp.asarray(w).astype(dtype).astype(jnp.float32) for w in layer]
                for layer in weights
            ],
        }
        for m in row_counts:
            x = jnp.asarray(rng.standard_normal((m, SHAPES[0][0]), np.float32))
            times = {s: [] for s in sides}
            for rep in range(args.repeat + 1):  # the first pass compiles
                for side, fn in sides.items():
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(x, params[side]))
                    if rep:
                        times[side].append(time.perf_counter() - t0)
            native, xla = (statistics.median(times[s]) * 1e3 for s in sides)
            rows.append({"weights": dtype, "rows": m, "native_ms": native, "xla_ms": xla})
    for r in rows:
        one = next(o for o in rows if o["weights"] == r["weights"] and o["rows"] == 1)
        r["native_vs_1_row"] = r["native_ms"] / one["native_ms"]
        r["xla_vs_1_row"] = r["xla_ms"] / one["xla_ms"]
        r["xla_vs_native"] = r["xla_ms"] / r["native_ms"]
    print(f"{LAYERS} GPT-2 small layers of matmuls: ms per decode step")
    print_table(
        rows,
        [
            ("weights", "weights", "s"),
            ("rows", "rows", "d"),
            ("native_ms", "kernels ms", ".2f"),
            ("native_vs_1_row", "kernels vs 1 row", ".2f"),
            ("xla_ms", "XLA ms", ".2f"),
            ("xla_vs_1_row", "XLA vs 1 row", ".2f"),
            ("xla_vs_native", "XLA / kernels", ".2f"),
        ],
    )
    save_record(args.json, "decode_rows", rows, argv=sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
