"""Training throughput: pipelined (per-module stages) against the fused single-program step.

For each engine and number of micro-batches M, runs a few steps of the same pathway and batch and
reports tokens/s, the ratio to the fused baseline measured in the same run, and the pipeline bubble
measured as 1 - sum(stage busy time) / (K * wall time), next to GPipe's (K - 1) / (M + K - 1).

    ./pants run tools/bench/train.py -- [--engines fused pipeline services] [--micro 1 4 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.pipeline.schedule import bubble_fraction
from pathways.pipeline.stage import LocalStage
from pathways.train import FusedEngine, PipelineEngine, TrainConfig, make_optimizer
from tools.bench.common import print_table, write_json

ROOT = Path(__file__).resolve().parents[2]


def services_engine(spec_path: Path, spec, pathway, cfg, n_micro, schedule, stack, cache):
    """Every module of the pathway in its own module-server process (loopback), started once."""
    import tempfile

    from pathways.deploy.launcher import Fleet
    from pathways.pipeline.client import remote_stages
    from pathways.serving.testing import make_checkpoint

    if "fleet" not in cache:
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-train-"))
        make_checkpoint(directory, spec_path)
        cache["fleet"] = stack.enter_context(
            Fleet(
                directory,
                list(spec.pathway(pathway).modules),
                gateway=False,
                module_args=["--training"],
            )
        )
    addresses = {m: a[0] for m, a in cache["fleet"].endpoints.items()}
    return PipelineEngine(remote_stages(spec, pathway, addresses, cfg), n_micro, schedule)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "examples/tiny.yaml"))
    ap.add_argument("--pathway", default=None)
    ap.add_argument("--engines", nargs="+", default=["fused", "pipeline", "services"])
    ap.add_argument("--micro", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="measured steps (after 2 warm-up steps)")
    ap.add_argument("--out", default=str(ROOT / "tools/bench/results/train.json"))
    args = ap.parse_args()

    import contextlib

    spec = spec_lib.load(args.spec)
    pathway = args.pathway or spec.default_pathway
    k = len(spec.pathway(pathway).modules)
    vocab = spec.modules[spec.pathway(pathway).modules[0]].vocab_size
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(args.steps + 2):
        toks = rng.integers(0, vocab, (args.batch_size, args.seq_len + 1)).astype(np.int32)
        batches.append((toks[:, :-1], toks[:, 1:]))
    cfg = TrainConfig(steps=1000, batch_size=args.batch_size, seq_len=args.seq_len)
    tokens = args.batch_size * args.seq_len
    rows = []
    cache: dict = {}
    with contextlib.ExitStack() as stack:
        base = None
        runs = [("fused", 1)] if "fused" in args.engines else []
        runs += [(e, m) for e in args.engines if e != "fused" for m in args.micro]
        engines = []
        for engine_name, m in runs:
            if engine_name == "fused":
                engine = FusedEngine(LocalExecutor(spec), pathway, make_optimizer(cfg))
            elif engine_name == "pipeline":
                tx = make_optimizer(cfg)
                engine = PipelineEngine(
                    [LocalStage(rt, tx) for rt in LocalExecutor(spec).chain(pathway)],
                    m,
                    args.schedule,
                )
            else:
                engine = services_engine(
                    Path(args.spec), spec, pathway, cfg, m, args.schedule, stack, cache
                )
            engines.append((engine_name, m, engine))
        # Rounds: every engine takes one step per round, so drift in the machine's load hits all
        # engines alike (this box's speed moves by 2x within minutes).
        timings = {i: ([], []) for i in range(len(engines))}
        for r, (inputs, targets) in enumerate(batches):
            for i, (_, _, engine) in enumerate(engines):
                t0 = time.perf_counter()
                out = engine.step(inputs, targets)
                if r >= 2:  # warm-up rounds compile
                    timings[i][0].append(time.perf_counter() - t0)
                    timings[i][1].append(out)
        for i, (engine_name, m, engine) in enumerate(engines):
            wall, outs = statistics.median(timings[i][0]), timings[i][1]
            if engine_name == "fused":
                base = tokens / wall
            row = {
                "engine": engine_name,
                "micro_batches": m,
                "step_s": wall,
                "tokens_per_s": tokens / wall,
                "vs_fused": (tokens / wall) / base if base else float("nan"),
                "bubble_measured": float("nan"),
                "bubble_gpipe": float("nan"),
            }
            if engine_name != "fused":
                busy = [sum(o["stage_seconds"].values()) for o in outs]
                walls = [o["wall_seconds"] for o in outs]
                row["bubble_measured"] = 1 - statistics.median(
                    b / (k * w) for b, w in zip(busy, walls)
                )
                row["bubble_gpipe"] = bubble_fraction(k, m)
            rows.append(row)
            close = getattr(engine, "close", None)
            if close:
                close()
    print_table(
        rows,
        [
            ("engine", "engine", ""),
            ("micro_batches", "M", "d"),
            ("step_s", "step s", ".3f"),
            ("tokens_per_s", "tok/s", ".0f"),
            ("vs_fused", "vs fused", ".2f"),
            ("bubble_measured", "bubble", ".2f"),
            ("bubble_gpipe", "GPipe bound", ".2f"),
        ],
    )
    print(f"wrote {write_json(args.out, 'train', rows, args=vars(args), stages=k)}")


if __name__ == "__main__":
    main()
