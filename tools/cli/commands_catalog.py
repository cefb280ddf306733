"""`pathways bench-pathways CHECKPOINT`: measures every pathway of a checkpoint (tokens/s, eval
loss), stores the results in the checkpoint's catalog (`catalog.json`, served by the gateway's
ListPathways and the HTTP front's /v1/models) and prints the trade-off table with a plot."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "bench-pathways",
        help="measure every pathway of a checkpoint (tokens/s, eval loss) into its catalog",
    )
    p.add_argument("checkpoint")
    p.add_argument(
        "--data",
        nargs="*",
        default=None,
        help="text files or folders for the eval loss (default: this Python's standard library)",
    )
    p.add_argument("--max-data-mb", type=float, default=2.0, help="read at most this much text")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens timed per pathway")
    p.add_argument("--pathway", action="append", default=[], help="only these (repeatable)")
    p.add_argument(
        "--plot",
        default=None,
        help="PNG of eval loss against parameters (default: CKPT/catalog.png)",
    )
    p.set_defaults(func=cmd_bench_pathways)


def cmd_bench_pathways(args) -> int:
    from pathways import catalog
    from pathways import checkpoint as ckpt
    from pathways import data as data_lib
    from pathways.executor.local import LocalExecutor

    if args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1; got {args.tokens}")
    spec, tok = ckpt.load_spec(args.checkpoint)
    names = args.pathway or list(spec.pathways)
    unknown = [n for n in names if n not in spec.pathways]
    if unknown:
        raise ValueError(
            f"unknown pathway(s) {', '.join(unknown)}; known: {', '.join(spec.pathways)}"
        )
    ex = LocalExecutor(spec, checkpoint=args.checkpoint)
    runnable = [
        n
        for n in names
        if all(ckpt.has_module(args.checkpoint, m) for m in spec.pathway(n).modules)
    ]
    if not runnable:
        raise ValueError(f"checkpoint {args.checkpoint} has the weights of none of {names}")
    paths = args.data if args.data else data_lib.default_corpus_paths()
    texts = data_lib.read_texts(paths, int(args.max_data_mb * 1e6))
    data = data_lib.TokenData.build(texts, tok)
    rows = []
    for name in runnable:
        print(f"measuring {name} ...", file=sys.stderr)
        m = catalog.measure(ex, name, tok, data, tokens=args.tokens)
        catalog.write_measured(args.checkpoint, name, m)
        rows.append(
            {**catalog.entry(spec, name, {name: m}), "ms_per_token": 1e3 / m["tokens_per_s"]}
        )
    rows.sort(key=lambda r: r["parameters"])
    print(
        f"{'pathway':<20} {'modules':>7} {'params':>12} {'weights MB':>10} {'ms/token':>9} "
        f"{'tokens/s':>9} {'eval loss':>9}"
    )
    for r in rows:
        print(
            f"{r['name']:<20} {len(r['modules']):>7} {r['parameters']:>12,} "
            f"{r['weight_bytes'] / 2**20:>10.1f} {r['ms_per_token']:>9.2f} "
            f"{r['tokens_per_s']:>9.1f} {r['eval_loss']:>9.3f}"
        )
    plot = Path(args.plot) if args.plot else Path(args.checkpoint) / "catalog.png"
    _plot(rows, plot)
    skipped = sorted(set(names) - set(runnable))
    if skipped:
        print(f"skipped (weights missing): {', '.join(skipped)}", file=sys.stderr)
    print(f"stored in {Path(args.checkpoint) / catalog.MEASURED}; plot {plot}")
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["parameters"] for r in rows]
    ys = [r["eval_loss"] for r in rows]
    ax.scatter(xs, ys)
    for r in rows:
        ax.annotate(
            f"{r['name']}\n{r['tokens_per_s']:.0f} tok/s",
            (r["parameters"], r["eval_loss"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xlabel("parameters")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title("pathways: accuracy, size and speed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
