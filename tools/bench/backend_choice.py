"""Does the default backend's measured choice (`PATHWAYS_KERNELS=auto`) pick the faster side?

`auto` decides per shape class (decode steps, prefill chunks) from a short probe run once per
machine (`pathways.kernels.build._measure`). This benchmark puts each probe's prediction next to
what a whole model does, all in one process on the same machine:

- probe v1 (until 2026-12-07, rebuilt here as the baseline): independent 768x3072 matmuls, 1 and
  8 rows for decode, 128 rows for prefill;
- probe v2 (the library's now): GPT-2-sized blocks one after another, a decode step's with the
  KV cache's write and attention;
- the model: a pathway (GPT-2 small by default, random weights) through the `LocalExecutor`
  with the native kernels for every shape against XLA's ops for every shape (same weights),
  alternated: decode ms per step at 1 and 8 sessions, prefill ms of a 128-token prompt.

Each row gives XLA's time / the kernels' (> 1: the kernels are faster) and what each probe would
choose (its ratio above the decision's margin). Prints a table and writes JSON.

    PYTHONPATH=libs:.:build/gen python -m tools.bench.backend_choice --spec examples/gpt2-small.yaml

To see the AVX2-only code paths on a CPU that also has AVX-512: `XLA_FLAGS=--xla_cpu_max_isa=AVX2
PATHWAYS_KERNELS_MARCH=haswell` (the kernels built for AVX2, XLA's generated code capped at AVX2;
XLA's dots still run AVX-512 there: its GEMM library is not capped, so XLA's side is faster than
on an AVX2-only CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("PATHWAYS_KERNELS", "native")  # both sides exist in one process

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pathways import kernels  # noqa: E402
from pathways import spec as spec_lib  # noqa: E402
from pathways.executor.local import LocalExecutor  # noqa: E402
from pathways.kernels import build  # noqa: E402
from pathways.sampling import SamplingParams  # noqa: E402
from tools.bench.common import print_table, save_record  # noqa: E402


def probe_v1() -> dict[str, tuple[float, float]]:
    """The first probe: median seconds (native, XLA) of independent 768x3072 matmuls per shape
    class (12 of them for 1 and 8 rows, 4 for 128 rows), alternated."""
    rng = np.random.default_rng(0)
    native = jax.jit(lambda x, ps: [kernels.matmul(x, p, 3072) for p in ps])
    xla = jax.jit(lambda x, ws: [x @ w for w in ws])
    out = {}
    for shape, (rows, layers) in {"decode": ((1, 8), 12), "prefill": ((128,), 4)}.items():
        ws = [jax.device_put(rng.standard_normal((768, 3072), np.float32)) for _ in range(layers)]
        packed = [kernels.pack(w) for w in ws]
        xs = [jax.device_put(rng.standard_normal((m, 768), np.float32)) for m in rows]
        sides = (("native", native, packed), ("xla", xla, ws))
        for _, fn, args in sides:
            for x in xs:
                jax.block_until_ready(fn(x, args))
        times = {"native": [], "xla": []}
        for _ in range(5):
            for name, fn, args in sides:
                t0 = time.perf_counter()
                for x in xs:
                    jax.block_until_ready(fn(x, args))
                times[name].append(time.perf_counter() - t0)
        out[shape] = (statistics.median(times["native"]), statistics.median(times["xla"]))
    return out


def model_times(spec_path: str, prompt_len: int, steps: int, repeat: int) -> dict:
    """Median seconds per decode step (1 and 8 sessions) and per prefill of one prompt, with the
    kernels for every shape and with XLA's ops, alternated: {(phase, sessions): (native, xla)}."""
    spec = spec_lib.load(spec_path)
    pathway = spec.default_pathway
    native = LocalExecutor(spec, native=True)
    xla = LocalExecutor(spec, {m: native.state(m) for m in native.runtimes}, native=False)
    vocab = spec.modules[spec.pathway(pathway).modules[0]].vocab_size
    rng = np.random.default_rng(0)

    def run(ex, b: int, n: int) -> tuple[float, float]:
        prompts = [rng.integers(0, vocab, prompt_len).tolist() for _ in range(b)]
        s = ex.open_session(pathway, [SamplingParams(max_new_tokens=n + 1)] * b)
        try:
            t0 = time.perf_counter()
            tok = ex.prefill(s, prompts).tokens
            np.asarray(tok)
            t1 = time.perf_counter()
            for _ in range(n):
                tok = ex.decode(s, tok).tokens
            np.asarray(tok)
            return t1 - t0, (time.perf_counter() - t1) / n
        finally:
            ex.close_session(s)

    out = {}
    for b in (1, 8):
        for ex in (native, xla):
            run(ex, b, 2)  # compiles
        times = {"native": [], "xla": []}
        for _ in range(repeat):
            for name, ex in (("native", native), ("xla", xla)):
                times[name].append(run(ex, b, steps))
        for i, phase in ((1, "decode"), (0, "prefill")):
            if phase == "prefill" and b != 1:
                continue
            out[(phase, b)] = tuple(
                statistics.median(t[i] for t in times[name]) for name in ("native", "xla")
            )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="examples/gpt2-small.yaml")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed generation")
    ap.add_argument("--repeat", type=int, default=7, help="alternated repetitions per side")
    ap.add_argument("--json", default=None, help="record (default: a dated file in results/)")
    args = ap.parse_args(argv)
    if kernels.mode() != "native" or not kernels.available():
        print("backend_choice: the native kernels must build here (PATHWAYS_KERNELS=native)")
        return 2
    probes = {"v1": probe_v1(), "v2": build._measure()}
    model = model_times(args.spec, args.prompt_len, args.steps, args.repeat)
    rows = []
    for (phase, b), (n_s, x_s) in model.items():
        row = {"shape": phase, "sessions": b, "model_native_ms": n_s * 1e3}
        row["model_xla_ms"], row["model_ratio"] = x_s * 1e3, x_s / n_s
        for v, times in probes.items():
            p_n, p_x = times[phase]
            row[f"probe_{v}_ratio"] = p_x / p_n
            row[f"probe_{v}_chooses"] = "native" if p_n * build._MARGIN < p_x else "xla"
        rows.append(row)
    print(f"{args.spec}: XLA's time / the kernels' (> 1: kernels faster); margin {build._MARGIN}")
    print_table(
        rows,
        [
            ("shape", "shape", "s"),
            ("sessions", "sessions", "d"),
            ("model_native_ms", "model native ms", ".2f"),
            ("model_xla_ms", "model XLA ms", ".2f"),
            ("model_ratio", "model x", ".2f"),
            ("probe_v1_ratio", "probe v1 x", ".2f"),
            ("probe_v1_chooses", "v1 chooses", "s"),
            ("probe_v2_ratio", "probe v2 x", ".2f"),
            ("probe_v2_chooses", "v2 chooses", "s"),
        ],
    )
    save_record(
        args.json,
        "backend_choice",
        rows,
        argv=sys.argv[1:],
        margin=build._MARGIN,
        probes={v: {k: list(t) for k, t in p.items()} for v, p in probes.items()},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
