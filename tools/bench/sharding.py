"""Tensor-parallel modules: weight memory per device and step time, sharded vs unsharded.

One process, the same parameters, the same `LocalExecutor` session API: unsharded (one device)
and split over a mesh of tp devices (`pathways.sharding`), alternated --repeat times; greedy
tokens of both compared. On CPU the devices are host devices sharing the machine's cores, so the
time ratio measures the cost of the partitioned program's communication, not a speed-up; on
GPUs/TPUs each device is its own chip.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      PYTHONPATH=libs:.:build/gen .venv/py312/bin/python -m tools.bench.sharding --tp 2 4 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from pathways import sharding
from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.sampling import SamplingParams
from tools.bench.common import dated_path, median, print_table, timed, write_json

ROOT = Path(__file__).resolve().parents[2]


def generate(ex, pathway: str, prompt: list[int], n: int):
    s = ex.open_session(pathway, [SamplingParams(max_new_tokens=n)])
    tok = ex.prefill(s, [prompt]).tokens
    out = [int(tok[0])]
    for _ in range(n - 1):
        tok = ex.decode(s, tok).tokens
        out.append(int(tok[0]))
    ex.close_session(s)
    return out


def bench(spec_path: Path, tps: list[int], prompt_len: int, n: int, repeat: int) -> list[dict]:
    spec = spec_lib.load(spec_path)
    pathway = spec.default_pathway
    ref = LocalExecutor(spec)
    states = {m: ref.state(m) for m in spec.modules}
    vocab = spec.modules[spec.pathway(pathway).modules[0]].input_contract[1]
    prompt = np.random.default_rng(0).integers(0, vocab, prompt_len).tolist()
    total = sum(int(a.nbytes) for m in spec.modules for a in jax.tree.leaves(states[m]))
    rows = []
    for tp in tps:
        ex = LocalExecutor(spec, states, mesh=sharding.make_mesh(tp))
        sides = {"unsharded": ref, "sharded": ex}
        want = {k: generate(e, pathway, prompt, n) for k, e in sides.items()}  # compiles
        times = {k: [] for k in sides}
        for _ in range(repeat):
            for k, e in sides.items():
                times[k] += timed(lambda e=e: generate(e, pathway, prompt, n), 1)
        per_device = {}
        notes = []
        for m in spec.modules:
            for dev, b in sharding.bytes_per_device(ex.state(m)).items():
                per_device[dev] = per_device.get(dev, 0) + b
            notes += ex.runtimes[m].placement.notes
        ratios = [u / s for u, s in zip(times["unsharded"], times["sharded"])]
        rows.append(
            {
                "spec": spec_path.name,
                "tp": tp,
                "weights_mb": total / 1e6,
                "max_per_device_mb": max(per_device.values()) / 1e6,
                "share": max(per_device.values()) / total,
                "unsharded_ms_per_token": median(times["unsharded"]) / n * 1e3,
                "sharded_ms_per_token": median(times["sharded"]) / n * 1e3,
                "sharded_vs_unsharded": median(ratios),
                "tokens_equal": want["sharded"] == want["unsharded"],
                "replicated": notes,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=[str(ROOT / "examples/tiny.yaml")])
    ap.add_argument("--tp", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5, help="alternating repetitions")
    ap.add_argument("--out", default=None, help="JSON record (default: a dated file in results/)")
    args = ap.parse_args()
    for tp in args.tp:
        sharding.make_mesh(tp)  # enough devices? (says how to get them on CPU)
    out = args.out or dated_path(ROOT / "tools/bench/results", "sharding")
    rows = [
        r
        for s in args.specs
        for r in bench(Path(s), args.tp, args.prompt_len, args.new_tokens, args.repeat)
    ]
    print_table(
        rows,
        [
            ("spec", "spec", ""),
            ("tp", "tp", "d"),
            ("weights_mb", "weights MB", ".1f"),
            ("max_per_device_mb", "most on a device MB", ".1f"),
            ("share", "share", ".3f"),
            ("unsharded_ms_per_token", "unsharded ms/tok", ".2f"),
            ("sharded_ms_per_token", "sharded ms/tok", ".2f"),
            ("sharded_vs_unsharded", "speed x", ".2f"),
            ("tokens_equal", "tokens equal", ""),
        ],
    )
    for r in rows:
        for note in r["replicated"]:
            print(f"  tp={r['tp']}: {note}")
    print("speed x: unsharded time / sharded (median of per-repetition ratios; prefill + decode)")
    print(f"wrote {write_json(out, 'sharding', rows, args=vars(args))}")


if __name__ == "__main__":
    main()
