"""Applications of the shared module kinds: a vision pathway trained on the digits data set.

Trains the spec's classification pathway through `LocalTrainer` (fused or pipeline engine) once
per seed, then reports test accuracy on the stratified 25 % test split (450 images), the mean
over seeds, parameters and training wall time.

    ./pants run tools/bench/applications.py -- [--seeds 0 1 2] [--steps 1500] [--engine fused]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pathways import spec as spec_lib
from pathways.classify import Classifier
from pathways.datasets.digits import digits
from pathways.executor.local import LocalExecutor
from pathways.tokenizers import ByteTokenizer
from pathways.train import LocalTrainer, TrainConfig
from tools.bench.common import dated_path, print_table, write_json

ROOT = Path(__file__).resolve().parents[2]


def vision(args) -> list[dict]:
    spec = spec_lib.load(args.spec)
    pathway = args.pathway or spec.default_pathway
    data = digits()
    data.check_pathway(spec, pathway)
    rows = []
    for seed in args.seeds:
        ex = LocalExecutor(spec, seed=seed)
        cfg = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=spec.pathway(pathway).max_seq_len,
            lr=args.lr,
            warmup=args.warmup,
            weight_decay=args.weight_decay,
            eval_every=args.steps,
            save_every=args.steps,
            seed=seed,
        )
        with tempfile.TemporaryDirectory(prefix="bench-apps-") as out:
            trainer = LocalTrainer(ex, pathway, cfg, data, out, ByteTokenizer(), engine=args.engine)
            t0 = time.perf_counter()
            history = trainer.run()
            seconds = time.perf_counter() - t0
        clf = Classifier(ex, pathway)
        rows.append(
            {
                "task": "vision (digits)",
                "seed": seed,
                "engine": args.engine,
                "test_accuracy": clf.accuracy(data.test_images, data.test_labels),
                "train_accuracy": clf.accuracy(data.train_images, data.train_labels),
                "final_loss": history[-1]["loss"],
                "params": sum(rt.param_count() for rt in ex.chain(pathway)),
                "train_seconds": seconds,
            }
        )
        print(f"seed {seed}: test accuracy {rows[-1]['test_accuracy']:.4f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "examples/digits.yaml"))
    ap.add_argument("--pathway", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--engine", choices=["fused", "pipeline"], default="fused")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--out", default=None, help="JSON path (default: a dated file in results/)")
    args = ap.parse_args()
    rows = vision(args)
    accs = [r["test_accuracy"] for r in rows]
    summary = {
        "task": "vision (digits)",
        "seed": "mean",
        "engine": args.engine,
        "test_accuracy": statistics.mean(accs),
        "train_accuracy": statistics.mean(r["train_accuracy"] for r in rows),
        "final_loss": statistics.mean(r["final_loss"] for r in rows),
        "params": rows[0]["params"],
        "train_seconds": statistics.mean(r["train_seconds"] for r in rows),
    }
    print_table(
        [*rows, summary],
        [
            ("task", "task", ""),
            ("seed", "seed", ""),
            ("engine", "engine", ""),
            ("test_accuracy", "test acc", ".4f"),
            ("train_accuracy", "train acc", ".4f"),
            ("final_loss", "last loss", ".4f"),
            ("params", "params", "d"),
            ("train_seconds", "train s", ".1f"),
        ],
    )
    out = args.out or dated_path(ROOT / "tools/bench/results", "applications")
    print(f"wrote {write_json(out, 'applications', rows, summary=summary, args=vars(args))}")


if __name__ == "__main__":
    main()
