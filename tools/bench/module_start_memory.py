"""Peak resident memory of one module server's start (issue 23): one module of a spec saved alone
with seeded random float32 weights, started as its own process as `pathways up` starts it
(`launcher.Fleet`), its peak (VmHWM) and resident (VmRSS) memory read once it is SERVING (weights
loaded, warmed up, compacted), for each weight storage, one server after the other. Memory in
MiB (written MB, as in big_pathway).

    PYTHONPATH=libs:.:build/gen .venv/py312/bin/python -m tools.bench.module_start_memory
    (default: attn-0 of examples/llama-1b.yaml, 3 layers, 132 M parameters, 504 MiB as float32)
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from pathways import checkpoint as ckpt
from pathways import modules as mod
from pathways import spec as spec_lib
from pathways.deploy import launcher
from pathways.tokenizers import ByteTokenizer
from tools.bench.big_pathway import proc_memory
from tools.bench.common import dated_path, print_table, write_json

ROOT = Path(__file__).resolve().parents[2]


def save_one_module(directory: str, spec: spec_lib.PathwaySpec, name: str) -> int:
    """Saves the spec and module `name`'s seeded random weights only; returns its parameters."""
    ckpt.save_spec(directory, spec, ByteTokenizer())
    state = nnx.state(mod.build(spec.modules[name], seed=0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    ckpt.save_module(directory, name, state)
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "examples/llama-1b.yaml"))
    p.add_argument("--module", default="attn-0")
    p.add_argument("--weights", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--kv-cache-mb", type=float, default=64.0)
    p.add_argument("--out", default=None, help="JSON record (default: a dated file in results/)")
    args = p.parse_args(argv)
    spec = spec_lib.load(args.spec)
    if args.module not in spec.modules:
        p.error(f"--module: {args.module!r} is not a module of {args.spec}")
    out = Path(args.out) if args.out else dated_path(ROOT / "tools/bench/results", "module_start")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        t = time.perf_counter()
        params = save_one_module(directory, spec, args.module)
        gc.collect()
        weights_mb = params * 4 / 2**20  # MiB, as proc_memory's figures
        print(
            f"{args.module}: {params / 1e6:.1f} M parameters, {weights_mb:.0f} MB as float32, "
            f"saved in {time.perf_counter() - t:.0f} s"
        )
        for storage in args.weights:
            t = time.perf_counter()
            module_args = ["--weights", storage, "--kv-cache-mb", str(args.kv_cache_mb)]
            with launcher.Fleet(
                directory, [args.module], gateway=False, module_args=module_args
            ) as fleet:
                start_s = time.perf_counter() - t
                mem = proc_memory(fleet.servers[args.module][0].proc.pid)
            rows.append(
                {
                    "weights": storage,
                    "start_s": start_s,
                    "peak_rss_mb": mem["VmHWM"],
                    "rss_mb": mem["VmRSS"],
                    "float32_weights_mb": weights_mb,
                    "peak_minus_weights_mb": mem["VmHWM"] - weights_mb,
                }
            )
            print(f"{storage}: peak {mem['VmHWM']:.0f} MB, resident {mem['VmRSS']:.0f} MB")
    print_table(
        rows,
        [
            ("weights", "weights", ""),
            ("start_s", "start s", ".0f"),
            ("peak_rss_mb", "peak RSS MB", ".0f"),
            ("rss_mb", "RSS when serving MB", ".0f"),
            ("float32_weights_mb", "float32 weights MB", ".0f"),
        ],
    )
    print(
        f"wrote {write_json(out, 'module_start_memory', rows, args=vars(args), parameters=params)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
