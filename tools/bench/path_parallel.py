"""DiLoCo against ordinary and synchronous data-parallel training: eval loss, bytes, wall time.

Every row trains the same pathway from the same initial parameters on the same data, with the
same total tokens and the same eval set, in one run. The initial parameters are random (from
scratch) or, with --warmup-steps W, those of W shared warm-up steps of one worker on batches of
K*b (other batches than the rows': seed + 1), as the DiLoCo paper starts from a pretrained model;
the warm-up's tokens are not counted in the rows'.

    single        one worker, batches of K*b, S steps (no communication at all)
    sync-dp       K workers, gradients averaged every step (S steps; each worker uploads and
                  downloads every parameter's gradient per step)
    diloco-H      K workers, each H inner AdamW steps on batches of b from its own shard, then an
                  outer Nesterov step (lr 0.7, momentum 0.9 by default) per module on the averaged
                  pseudo-gradients (S / H rounds; per round each worker downloads the parameters
                  and uploads its pseudo-gradient)
    diloco-H-int8 the same with int8 pseudo-gradients (one scale per 64 values)
    fault-H       diloco-H with one worker lost (its round's work dropped) in each of 3 rounds; it
                  rejoins the next round with its inner optimizer state of the lost round's start
                  (as the job does) and its shard's batches again
    dense-b       one worker, batches of b, S steps: the tokens of one DiPaCo path
    dipaco-4xH    DiPaCo: 2 x 2 choices of the first two attention modules = 4 paths, each the
                  size of the dense model, documents routed by k-means (`parallel/dipaco.py`),
                  S steps of b per path, modules synchronised every H among their paths; eval
                  sequences each served by the one path they route to

Workers run one after another in this process, with the same arithmetic as the coordinator's
jobs (`parallel/diloco.py`); a K-worker row's compute time is its measured time / K. Wall time is
modelled for links of 10 Gb/s, 1 Gb/s and 100 Mb/s as compute + bytes per worker / bandwidth +
exchanges x latency (50 ms per exchange by default).

    PYTHONPATH=libs:.:build/gen .venv/py312/bin/python -m tools.bench.path_parallel --quick
    (the full run: H in 10, 50, 200 over 2,000 steps per worker of 8 x 64 tokens after a shared
    warm-up of 500 steps; about 45 minutes on 2 quiet Zen 4 cores)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from pathways import data as data_lib
from pathways import spec as spec_lib
from pathways import tokenizers
from pathways.executor.local import LocalExecutor
from pathways.modules import registry
from pathways.parallel import diloco, dipaco
from pathways.train import TrainConfig
from tools.bench.common import dated_path, print_table, write_json

ROOT = Path(__file__).resolve().parents[2]
LINKS = {"10Gb/s": 10e9 / 8, "1Gb/s": 1e9 / 8, "100Mb/s": 100e6 / 8}


class Setup:
    def __init__(self, args):
        self.args = args
        self.spec = spec_lib.load(args.spec)
        self.pathway = self.spec.default_pathway
        texts = data_lib.read_texts(data_lib.default_corpus_paths(), int(args.max_data_mb * 1e6))
        self.data = data_lib.TokenData.build(texts, tokenizers.ByteTokenizer())
        self.ex = LocalExecutor(self.spec, seed=args.seed)
        self.names = [rt.name for rt in self.ex.chain(self.pathway)]
        self.init = {n: self.ex.state(n) for n in self.names}
        self.outer = {"outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum}
        self.warmup_s = self._warm_up() if args.warmup_steps else 0.0
        self.params = sum(
            int(np.prod(a.shape)) for n in self.names for a in jax.tree.leaves(self.init[n])
        )
        self.shards = [diloco.shard(self.data.train, args.workers, k) for k in range(args.workers)]

    def _warm_up(self) -> float:
        """W steps of one worker on batches of K*b from the whole data (seed + 1): every row's
        initial parameters. Returns its seconds."""
        a = self.args
        batch = a.batch_size * a.workers
        cfg = self.train_config(batch, steps=a.warmup_steps)
        worker = diloco.InnerWorker(self.ex, self.pathway, diloco.inner_optimizer("adamw", cfg))
        batches = (self.data.batch(s, batch, a.seq_len, a.seed + 1) for s in range(a.warmup_steps))
        t0 = time.perf_counter()
        self.init, _, _ = worker.train(self.init, worker.init_opt(), batches)
        seconds = time.perf_counter() - t0
        print(
            f"warm-up: {a.warmup_steps} steps in {seconds:.0f} s, eval loss "
            f"{self.eval_loss(self.init):.4f}",
            flush=True,
        )
        return seconds

    def train_config(self, batch: int, steps: int | None = None) -> TrainConfig:
        a = self.args
        steps = steps or a.steps
        return TrainConfig.with_warmup(
            steps, batch_size=batch, seq_len=a.seq_len, lr=a.lr, seed=a.seed
        )

    def eval_loss(self, params) -> float:
        a = self.args
        for n in self.names:
            self.ex.set_state(n, params[n])
        return float(
            np.mean(
                [
                    self.ex.loss(
                        self.pathway,
                        *self.data.batch(i, a.batch_size, a.seq_len, a.seed, split="eval"),
                    )
                    for i in range(a.eval_batches)
                ]
            )
        )

    def eval_points(self) -> list[int]:
        a = self.args
        return sorted({max(1, round(a.steps * (i + 1) / a.evals)) for i in range(a.evals)})


def run_synchronous(setup: Setup, sharded: bool) -> dict:
    """One optimizer over batches of K*b: the K shards' batches side by side (sync-dp: the mean
    of K equal-size shard gradients is the gradient of their union) or the unsharded data."""
    a, k = setup.args, setup.args.workers
    worker = diloco.InnerWorker(
        setup.ex,
        setup.pathway,
        diloco.inner_optimizer("adamw", setup.train_config(a.batch_size * k)),
    )
    params, opt = dict(setup.init), worker.init_opt()
    curve, seconds, done = [], 0.0, 0
    for point in setup.eval_points():

        def batches(first=done, n=point - done):
            for s in range(first, first + n):
                if sharded:
                    parts = [
                        diloco.shard_batch(setup.shards[w], w, s, a.batch_size, a.seq_len, a.seed)
                        for w in range(k)
                    ]
                    yield np.concatenate([p[0] for p in parts]), np.concatenate(
                        [p[1] for p in parts]
                    )
                else:
                    yield setup.data.batch(s, a.batch_size * k, a.seq_len, a.seed)

        t0 = time.perf_counter()
        params, opt, _ = worker.train(params, opt, batches())
        seconds += time.perf_counter() - t0
        done = point
        curve.append((done, setup.eval_loss(params)))
    grad_bytes = 4 * setup.params
    return {
        "compute_s": seconds / (k if sharded else 1),
        "bytes_per_worker": 2 * grad_bytes * a.steps if sharded else 0,
        "exchanges": a.steps if sharded else 0,
        "curve": curve,
    }


def run_dense(setup: Setup) -> dict:
    """The dense baseline of the DiPaCo rows: one worker, batches of b (not K*b), S steps: as many
    tokens as each DiPaCo path sees (a quarter of all of them with 4 paths)."""
    a = setup.args
    worker = diloco.InnerWorker(
        setup.ex, setup.pathway, diloco.inner_optimizer("adamw", setup.train_config(a.batch_size))
    )
    batches = (setup.data.batch(s, a.batch_size, a.seq_len, a.seed) for s in range(a.steps))
    t0 = time.perf_counter()
    params, _, _ = worker.train(dict(setup.init), worker.init_opt(), batches)
    seconds = time.perf_counter() - t0
    return {
        "compute_s": seconds,
        "bytes_per_worker": 0,
        "exchanges": 0,
        "curve": [(a.steps, setup.eval_loss(params))],
    }


def run_dipaco(setup: Setup, h: int) -> dict:
    """4 paths: the first two attention modules of the pathway, 2 choices each (embedding and
    head shared by all paths); every copy starts from the dense model's initial parameters
    (the warm-up's, or random). Training documents (512 tokens) go to paths by k-means on the
    frozen initial dense pathway's mean hidden state of their first 64 tokens, balanced; each
    path trains S steps of batches of b on its documents, modules synchronised every h steps
    among the paths that use them. Eval: each eval sequence routed (unbalanced) to one path."""
    a = setup.args
    # The first two modules with a KV cache: the attention modules (the grid's choices).
    attn = [m for m in setup.names if registry.of(setup.spec.modules[m]).has_cache][:2]
    spec = spec_lib.from_dict(
        dipaco.grid(setup.spec.to_dict(), setup.pathway, {m: 2 for m in attn})
    )
    paths = list(spec.pathways)
    for n in setup.names:
        setup.ex.set_state(n, setup.init[n])
    docs = dipaco.documents(setup.data.train, 512)
    feats = dipaco.features(setup.ex, setup.pathway, docs, prefix=64)
    router = dipaco.Router.fit(feats, paths, seed=a.seed)
    assigned = router.assign_balanced(feats)
    path_tokens = {p: docs[assigned == i].reshape(-1) for i, p in enumerate(paths)}
    base = {m: m if m in setup.init else m.rsplit(".", 1)[0] for m in spec.modules}
    ex = LocalExecutor(spec, {m: setup.init[base[m]] for m in spec.modules})
    cfg = diloco.DiLoCoConfig(workers=len(paths), inner_steps=h, **setup.outer)
    t0 = time.perf_counter()
    dipaco.simulate(ex, paths, setup.train_config(a.batch_size), cfg, path_tokens, a.steps // h)
    seconds = time.perf_counter() - t0
    # Eval: the same eval batches as every row, each sequence through the path it routes to.
    total, routed = 0.0, np.zeros(len(paths), int)
    for i in range(a.eval_batches):
        x, y = setup.data.batch(i, a.batch_size, a.seq_len, a.seed, split="eval")
        where = router.route(dipaco.features(setup.ex, setup.pathway, x, prefix=min(64, a.seq_len)))
        s, per_path = dipaco.routed_loss(ex, paths, where, x, y)
        total, routed = total + s, routed + per_path
    rows = int(routed.sum())
    path_params = sum(
        int(np.prod(np.shape(x)))
        for m in spec.pathway(paths[0]).modules
        for x in jax.tree.leaves(ex.state(m))
    )
    rounds = a.steps // h
    return {
        "compute_s": seconds / len(paths),
        "bytes_per_worker": 2 * 4 * path_params * rounds,
        "exchanges": rounds,
        "curve": [(a.steps, total / rows)],
        "paths": paths,
        "train_documents_per_path": np.bincount(assigned, minlength=len(paths)).tolist(),
        "eval_sequences_per_path": routed.tolist(),
        "total_params": sum(
            int(np.prod(np.shape(x))) for m in spec.modules for x in jax.tree.leaves(ex.state(m))
        ),
    }


def run_diloco(setup: Setup, h: int, compress: str = "none", lose: dict | None = None) -> dict:
    """S / h rounds of K workers; `lose` maps a round to the worker lost in it."""
    a, k = setup.args, setup.args.workers
    cfg = diloco.DiLoCoConfig(workers=k, inner_steps=h, compress=compress, **setup.outer)
    worker = diloco.InnerWorker(
        setup.ex, setup.pathway, diloco.inner_optimizer("adamw", setup.train_config(a.batch_size))
    )
    outer = diloco.OuterOptimizer(cfg)
    params = dict(setup.init)
    outer_state = {n: outer.init(p) for n, p in params.items()}
    inner = [worker.init_opt() for _ in range(k)]
    positions = [0] * k
    rounds = a.steps // h
    points, curve, seconds, bytes_up, bytes_down = setup.eval_points(), [], 0.0, 0, 0
    for r in range(rounds):
        t0 = time.perf_counter()
        grads = {n: [] for n in params}
        for w in range(k):
            bytes_down += 4 * setup.params
            batches = (
                diloco.shard_batch(
                    setup.shards[w], w, positions[w] + i, a.batch_size, a.seq_len, a.seed
                )
                for i in range(h)
            )
            local, opt, _ = worker.train(params, inner[w], batches)
            if lose and lose.get(r) == w:  # killed before it uploaded: its work is dropped
                # It rejoins with its inner state of this round's start (as the job carries it
                # over) and retrains from its position, which stays.
                continue
            inner[w] = opt
            positions[w] += h
            for n in params:
                sent = diloco.encode(diloco.pseudo_gradient(params[n], local[n]), compress)
                bytes_up += diloco.nbytes(sent)
                grads[n].append(diloco.decode(sent, compress, params[n]))
        for n in params:
            params[n], outer_state[n] = outer.step(params[n], outer_state[n], grads[n])
        seconds += time.perf_counter() - t0
        step = (r + 1) * h
        crossed = [p for p in points if p <= step]
        if crossed:  # an eval at the first round boundary at or past each eval point
            points = points[len(crossed) :]
            curve.append((step, setup.eval_loss(params)))
    if not curve or curve[-1][0] != rounds * h:
        curve.append((rounds * h, setup.eval_loss(params)))
    return {
        "compute_s": seconds / k,
        "bytes_per_worker": (bytes_up + bytes_down) / k,
        "exchanges": rounds,
        "curve": curve,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "examples/tiny.yaml"))
    ap.add_argument("--quick", action="store_true", help="every row at a smaller scale (minutes)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None, help="steps per worker (S)")
    ap.add_argument("--inner", type=int, nargs="+", default=None, help="H values")
    ap.add_argument("--batch-size", type=int, default=None, help="per worker (b)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-data-mb", type=float, default=None)
    ap.add_argument("--evals", type=int, default=10, help="eval points along the run")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--latency-ms", type=float, default=50.0, help="per exchange, for the model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo's outer Nesterov step")
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="shared warm-up steps (0: from scratch; default: 500, --quick 0)",
    )
    ap.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help="only these rows (e.g. sync-dp diloco-50; default: every row)",
    )
    ap.add_argument("--out", default=None, help="JSON record (default: a dated file in results/)")
    args = ap.parse_args()
    quick = dict(steps=120, inner=[3, 12, 30], batch_size=8, seq_len=64, max_data_mb=1.0)
    full = dict(steps=2000, inner=[10, 50, 200], batch_size=8, seq_len=64, max_data_mb=8.0)
    quick["warmup_steps"], full["warmup_steps"] = 0, 500
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(args.steps % h for h in args.inner):
        ap.error(f"--steps {args.steps} must be a multiple of every --inner value {args.inner}")
    out = Path(args.out) if args.out else dated_path(ROOT / "tools/bench/results", "path_parallel")

    mid = args.inner[len(args.inner) // 2]
    rounds = args.steps // mid
    rng = np.random.default_rng(args.seed)
    lost_rounds = sorted(rng.choice(np.arange(1, rounds), size=min(3, rounds - 1), replace=False))
    lose = {int(r): int(rng.integers(0, args.workers)) for r in lost_rounds}
    plan = [
        ("single", {}, lambda: run_synchronous(setup, sharded=False)),
        ("sync-dp", {}, lambda: run_synchronous(setup, sharded=True)),
        *((f"diloco-{h}", {"h": h}, lambda h=h: run_diloco(setup, h)) for h in args.inner),
        (f"diloco-{mid}-int8", {"h": mid}, lambda: run_diloco(setup, mid, "int8")),
        (f"fault-{mid}", {"h": mid, "lost": lose}, lambda: run_diloco(setup, mid, lose=lose)),
        ("dense-b", {}, lambda: run_dense(setup)),
        (f"dipaco-4x{mid}", {"h": mid}, lambda: run_dipaco(setup, mid)),
    ]
    unknown = sorted(set(args.rows or ()) - {name for name, _, _ in plan})
    if unknown:
        ap.error(f"--rows: no row {', '.join(unknown)}; rows: {', '.join(n for n, _, _ in plan)}")
    setup = Setup(args)
    rows = []
    for name, extra, run in plan:
        if args.rows is None or name in args.rows:
            rows.append({"row": name, **extra, **run()})
            print(f"{name}: eval loss {rows[-1]['curve'][-1][1]:.4f}", flush=True)

    for r in rows:
        r["eval_loss"] = r["curve"][-1][1]
    sync = next((r for r in rows if r["row"] == "sync-dp"), None)
    for r in rows:
        r["vs_sync_dp"] = r["eval_loss"] / sync["eval_loss"] - 1 if sync else None
        r["bytes_ratio"] = (
            sync["bytes_per_worker"] / r["bytes_per_worker"]
            if sync and r["bytes_per_worker"]
            else None
        )
        for link, bw in LINKS.items():
            r[f"wall_{link}"] = (
                r["compute_s"] + r["bytes_per_worker"] / bw + r["exchanges"] * args.latency_ms / 1e3
            )
    print(
        f"{args.spec}: {setup.params / 1e6:.2f} M parameters, K={args.workers} workers, "
        f"S={args.steps} steps per worker, b={args.batch_size} x {args.seq_len} tokens, "
        + (
            f"after a shared warm-up of {args.warmup_steps} steps ({setup.warmup_s:.0f} s)"
            if args.warmup_steps
            else "from scratch"
        )
    )
    print_table(
        rows,
        [
            ("row", "row", ""),
            ("eval_loss", "eval loss", ".4f"),
            ("vs_sync_dp", "vs sync-dp", "+.2%"),
            ("bytes_per_worker", "bytes/worker", ".3g"),
            ("bytes_ratio", "sync-dp bytes / these", ".1f"),
            ("compute_s", "compute s", ".1f"),
            ("wall_10Gb/s", "10Gb/s s", ".1f"),
            ("wall_1Gb/s", "1Gb/s s", ".1f"),
            ("wall_100Mb/s", "100Mb/s s", ".1f"),
        ],
    )
    if any(r["row"] == f"fault-{mid}" for r in rows):
        print(f"fault-{mid}: lost (round: worker) {lose}")
    plot = out.with_suffix(".png")
    _plot(rows, plot)
    print(f"wrote {write_json(out, 'path_parallel', rows, args=vars(args), plot=plot.name)}")


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, marker=".", label=r["row"])
    ax.set_xlabel("steps per worker (equal tokens across rows)")
    ax.set_ylabel("eval loss")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
