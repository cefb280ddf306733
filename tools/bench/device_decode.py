"""Decode and prefill throughput of whole pathways on one device, against its memory bandwidth.

For each spec and weight storage: random weights made on the device (a 1 B checkpoint cannot be
carried to a lent machine), then, through the `LocalExecutor` session API (what users run),
prefill of --prompt-len tokens and greedy decode of --new-tokens, with 1 session and with
--sessions sessions at once (one batched step for all). A decode step reads every weight once, so

    fraction of bandwidth = weight bytes per step / step time / peak bandwidth

(KV-cache reads not counted: a lower bound on the bytes moved). --peak-gbps defaults to the
datasheet figure of a known device (H100 SXM 3,350 GB/s, H200 4,800 GB/s), else none.

    PYTHONPATH=libs:. python3 tools/bench/device_decode.py                  # a GPU machine
    PYTHONPATH=libs:.:build/gen .venv/py312/bin/python -m tools.bench.device_decode \
        --specs examples/tiny.yaml --sessions 4 --new-tokens 8              # CPU check
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "libs"), str(ROOT)]

from pathways import spec as spec_lib  # noqa: E402
from pathways import weights as weights_lib  # noqa: E402
from pathways.executor.local import LocalExecutor  # noqa: E402
from pathways.sampling import SamplingParams  # noqa: E402
from tools.bench.common import dated_path, print_table, write_json  # noqa: E402

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L4": 300.0}


def peak_for(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_GBPS.items() if k in kind), None)


def run(ex, pathway: str, prompts: list[list[int]], n: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step) for len(prompts) sessions in one batch."""
    s = ex.open_session(pathway, [SamplingParams()] * len(prompts))
    t0 = time.perf_counter()
    r = ex.prefill(s, prompts)
    np.asarray(r.tokens)
    t1 = time.perf_counter()
    for _ in range(n):
        r = ex.decode(s, r.tokens)
    np.asarray(r.tokens)
    t2 = time.perf_counter()
    ex.close_session(s)
    return t1 - t0, (t2 - t1) / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--specs",
        nargs="+",
        default=[str(ROOT / "examples/gpt2-small.yaml"), str(ROOT / "examples/llama-1b.yaml")],
    )
    ap.add_argument("--weights", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sessions", type=int, default=32, help="the batched row's sessions")
    ap.add_argument("--peak-gbps", type=float, default=None)
    ap.add_argument("--out", default=None, help="JSON record (default: a dated file in results/)")
    args = ap.parse_args(argv)
    device = jax.devices()[0]
    peak = args.peak_gbps or peak_for(device)
    out = Path(args.out) if args.out else dated_path(ROOT / "tools/bench/results", "device_decode")
    rows = []
    for path in args.specs:
        spec = spec_lib.load(path)
        pathway = spec.default_pathway
        vocab = next(c.vocab_size for c in spec.modules.values() if hasattr(c, "vocab_size"))
        rng = np.random.default_rng(0)
        for storage in args.weights:
            t = time.perf_counter()
            ex = LocalExecutor(spec, weights=storage)
            for rt in ex.runtimes.values():
                rt.compact()  # serve from one copy, as a module server does
            made_s = time.perf_counter() - t
            step_bytes = sum(
                weights_lib.nbytes(ex.runtimes[m].serving_state)
                for m in spec.pathway(pathway).modules
            )
            for sessions in (1, args.sessions):
                prompts = [
                    [int(x) for x in rng.integers(0, vocab, args.prompt_len)]
                    for _ in range(sessions)
                ]
                run(ex, pathway, prompts, args.new_tokens)  # compiles every shape
                prefill_s, step_s = run(ex, pathway, prompts, args.new_tokens)
                row = {
                    "spec": Path(path).name,
                    "weights": storage,
                    "sessions": sessions,
                    "weight_gb": step_bytes / 1e9,
                    "made_s": made_s,
                    "prefill_tok_s": sessions * args.prompt_len / prefill_s,
                    "decode_ms_per_step": step_s * 1e3,
                    "decode_tok_s": sessions / step_s,
                    "gbps": step_bytes / step_s / 1e9,
                }
                row["of_peak"] = row["gbps"] / peak if peak else None
                rows.append(row)
                print(
                    f"{row['spec']} {storage} x{sessions}: {row['decode_tok_s']:.1f} tok/s",
                    file=sys.stderr,
                    flush=True,
                )
            del ex
            gc.collect()
    print(f"{device.platform}: {getattr(device, 'device_kind', '')}; peak {peak} GB/s")
    print_table(
        rows,
        [
            ("spec", "spec", ""),
            ("weights", "weights", ""),
            ("sessions", "sessions", "d"),
            ("weight_gb", "weights GB", ".2f"),
            ("prefill_tok_s", "prefill tok/s", ".0f"),
            ("decode_ms_per_step", "ms/step", ".2f"),
            ("decode_tok_s", "decode tok/s", ".1f"),
            ("gbps", "weights GB/s", ".0f"),
            ("of_peak", "of peak", ".2f"),
        ],
    )
    print(f"wrote {write_json(out, 'device_decode', rows, args=vars(args), peak_gbps=peak)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
