"""A decode step's KV-cache write and attention: the kernels' op against XLA's ops.

Times a decode step of an attention module of GPT-2 small's 12 layers (random weights, the cache
donated, `Attention.forward_cached`) with its cache write and attention as the kernels' op
(`pathways.kernels.attend_cached`: `native=True`) and as the model's XLA path (scatter, window
gather, batched dots), for 1 and 8 sessions attending to 64, 256 and 1024 cached positions,
alternated in one process. Both sides compute the layers' matmuls with XLA's dot, so the
difference is the attention's. Prints a table and writes JSON.

    PYTHONPATH=libs:.:build/gen python -m tools.bench.attend_cached

`XLA_FLAGS=--xla_cpu_max_isa=AVX2 PATHWAYS_KERNELS_MARCH=haswell` gives the AVX2 code paths on a
CPU that also has AVX-512, except XLA's dots (the flag caps XLA's generated code, not the GEMM
library its dots call, which still runs AVX-512).
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
from flax import nnx  # noqa: E402

from pathways import backends, kernels, modules  # noqa: E402
from pathways.modules import attention  # noqa: E402
from tools.bench.common import print_table, save_record  # noqa: E402

CONFIG = modules.AttentionConfig(d_model=768, n_layers=12, n_heads=12, max_seq_len=1024)


def step_fn(graphdef, window: int, native: bool):
    """jit of one decode step: (state, x (B, 1, D), positions, cache, slots) -> (y, cache)."""

    def step(state, x, positions, cache, slots):
        with backends.using(native):  # as the runtime traces a module's step
            return nnx.merge(graphdef, state).forward_cached(x, positions, cache, slots, window)

    return jax.jit(step, donate_argnums=3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=9, help="alternated passes per side")
    ap.add_argument("--json", default=None, help="record (default: a dated file in results/)")
    args = ap.parse_args(argv)
    if kernels.mode() != "native" or not kernels.available():
        print("attend_cached: the native kernels must build here (PATHWAYS_KERNELS=native)")
        return 2
    rng = np.random.default_rng(0)
    graphdef, state = nnx.split(modules.build(CONFIG))
    slots_n = 8
    rows = []
    for sessions in (1, 8):
        for window in (64, 256, 1024):
            sides = {"native": step_fn(graphdef, window, True)}
            sides["xla"] = step_fn(graphdef, window, False)
            x = jnp.asarray(rng.standard_normal((sessions, 1, CONFIG.d_model), np.float32))
            positions = jnp.full((sessions, 1), window - 1, jnp.int32)
            slots = jnp.arange(sessions, dtype=jnp.int32)
            caches = {s: attention.empty_cache(CONFIG, slots_n) for s in sides}
            times = {s: [] for s in sides}
            for rep in range(args.repeat + 1):  # the first pass compiles
                for side, fn in sides.items():
                    t0 = time.perf_counter()
                    _, caches[side] = jax.block_until_ready(
                        fn(state, x, positions, caches[side], slots)
                    )
                    if rep:
                        times[side].append(time.perf_counter() - t0)
            native, xla = (statistics.median(times[s]) * 1e3 for s in ("native", "xla"))
            rows.append(
                {
                    "sessions": sessions,
                    "window": window,
                    "native_ms": native,
                    "xla_ms": xla,
                    "xla_vs_native": xla / native,
                    "xla_minus_native_ms": xla - native,
                }
            )
    print(f"{CONFIG.n_layers} GPT-2 small layers, {slots_n} cache slots: ms per decode step")
    print_table(
        rows,
        [
            ("sessions", "sessions", "d"),
            ("window", "positions", "d"),
            ("native_ms", "kernels ms", ".2f"),
            ("xla_ms", "XLA ms", ".2f"),
            ("xla_vs_native", "XLA / kernels", ".2f"),
            ("xla_minus_native_ms", "XLA - kernels ms", ".2f"),
        ],
    )
    save_record(args.json, "attend_cached", rows, argv=sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
