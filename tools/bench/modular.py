"""Modular trade-offs: pathway compositions (accuracy, speed, memory) and module-wise training.

1. Trains a base pathway (embed -> attn-0..attn-3 -> head) end to end, then evaluates pathways
   composed of its shared modules (fewer attention modules, a module inserted and trained alone, a
   blockwise-distilled student with narrower MLPs and the same student shape trained end to end):
   eval loss, greedy decode tokens/s (batch 1, KV cache) and parameter memory per module; a table
   and a PNG chart.
2. Wall clock of parallel module-wise training (blockwise distillation through the coordinator:
   a real broker and one worker with W pool processes, one task per module) against end-to-end
   training of the same student shape until it reaches the distilled student's eval loss.

    ./pants run tools/bench/modular.py -- [--steps 300] [--workers 1 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import jax
import numpy as np

from pathways import data as data_lib
from pathways import spec as spec_lib
from pathways import surgery
from pathways.distill.job import ensure_store, load_checkpoint
from pathways.distill.request import DistillRequest
from pathways.evaluation import eval_loss
from pathways.executor.local import LocalExecutor
from pathways.sampling import SamplingParams
from pathways.tokenizers import ByteTokenizer
from pathways.train import FusedEngine, LocalTrainer, TrainConfig, make_optimizer
from tools.bench.common import print_table, write_json

ROOT = Path(__file__).resolve().parents[2]
ATTN = [f"attn-{i}" for i in range(4)]


def base_spec(d: int, seq: int, d_ff: int | None = None) -> dict:
    attn = {
        "kind": "attention",
        "d_model": d,
        "n_layers": 1,
        "n_heads": max(1, d // 16),
        "max_seq_len": seq,
    }
    if d_ff:
        attn["d_ff"] = d_ff
    mods = {"embed": {"kind": "embedding", "vocab_size": 257, "d_model": d, "max_seq_len": seq}}
    mods.update({a: dict(attn) for a in ATTN})
    mods["head"] = {"kind": "decoding", "d_model": d, "vocab_size": 257}
    return {"modules": mods, "pathways": {"full": ["embed", *ATTN, "head"]}}


def decode_tokens_per_s(ex: LocalExecutor, pathway: str, new_tokens: int = 48) -> float:
    """Greedy decode rate, batch 1, after an 8-token prefill (compilation excluded)."""
    prompt = [list(range(65, 73))]
    for _ in range(2):  # the first pass compiles every window bucket
        s = ex.open_session(pathway, [SamplingParams()])
        tok = ex.prefill(s, prompt).tokens
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            tok = ex.decode(s, tok).tokens
        dt = time.perf_counter() - t0
        ex.close_session(s)
    return new_tokens / dt


def module_memory(ex: LocalExecutor, pathway: str) -> dict[str, float]:
    """Parameter bytes per module (MB, float32)."""
    return {rt.name: rt.param_count() * 4 / 1e6 for rt in ex.chain(pathway)}


def kv_kib_per_token(ex: LocalExecutor, pathway: str) -> float:
    return sum(rt.cfg.kv_bytes_per_token() for rt in ex.chain(pathway) if rt.kind.has_cache) / 1024


def row(label: str, ex: LocalExecutor, pathway: str, data, ev: dict) -> dict:
    mem = module_memory(ex, pathway)
    r = {
        "pathway": label,
        "modules": " ".join(ex.spec.pathway(pathway).modules),
        "n_modules": len(mem),
        "params_mb": sum(mem.values()),
        "module_mb": " ".join(f"{k}={v:.3f}" for k, v in mem.items()),
        "kv_kib_per_token": kv_kib_per_token(ex, pathway),
        "eval_loss": eval_loss(ex, pathway, data, **ev),
        "decode_tok_s": decode_tokens_per_s(ex, pathway),
    }
    r["perplexity"] = float(np.exp(r["eval_loss"]))
    print(
        f"{label}: eval {r['eval_loss']:.3f}, {r['decode_tok_s']:.0f} tok/s, "
        f"{r['params_mb']:.3f} MB",
        flush=True,
    )
    return r


def plot(rows: list[dict], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["pathway"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5), dpi=100)
    for ax, key, title in zip(
        axes,
        ("eval_loss", "decode_tok_s", "params_mb"),
        (
            "eval loss (nats/token, lower is better)",
            "greedy decode tokens/s (batch 1)",
            "parameters (MB, float32)",
        ),
    ):
        ax.barh(labels, [r[key] for r in rows], color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        if key == "eval_loss":
            lo = min(r[key] for r in rows)
            ax.set_xlim(lo - 0.2, max(r[key] for r in rows) + 0.05)
        else:
            ax.set_yticklabels([])
    fig.suptitle("Pathway compositions over shared modules: accuracy, speed, memory")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


@contextlib.contextmanager
def coordinator(workers: int, queues: list[str], workdir: Path):
    from pathways.coordinator import worker
    from pathways.coordinator.app import DEFAULT_QUEUE, make_app
    from pathways.coordinator.broker import EmbeddedBroker

    with EmbeddedBroker(workdir=workdir) as broker:
        proc = worker.spawn(
            broker.url, concurrency=workers, queues=",".join([DEFAULT_QUEUE, *queues])
        )
        try:
            yield make_app(broker.url)
        finally:
            worker.stop(proc)


def e2e_time_to(spec, data, target: float, cfg: TrainConfig, ev: dict, every: int):
    """Trains `spec` end to end (fused) until its eval loss <= target; (seconds, steps, loss).

    Seconds count training steps only (not the evaluations that check the target).
    """
    ex = LocalExecutor(spec, seed=cfg.seed)
    pathway = spec.default_pathway
    engine = FusedEngine(ex, pathway, make_optimizer(cfg))
    spent, loss = 0.0, float("inf")
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        engine.step(*data.batch(step, cfg.batch_size, cfg.seq_len, cfg.seed))
        dt = time.perf_counter() - t0
        spent += dt if step != 1 else 2 * dt  # step 0 compiled: count it as long as step 1
        if step == 0:
            spent = 0.0
        if (step + 1) % every == 0:
            loss = eval_loss(ex, pathway, data, **ev)
            if loss <= target:
                return spent, step + 1, loss
    return spent, cfg.steps, loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300, help="end-to-end steps of the base pathway")
    ap.add_argument("--module-steps", type=int, default=200, help="steps per distilled module")
    ap.add_argument("--rows", type=int, default=512, help="teacher windows recorded")
    ap.add_argument("--max-data-mb", type=float, default=1.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--e2e-max-steps", type=int, default=3000)
    ap.add_argument("--work", default="/tmp/pathways-bench-modular")
    ap.add_argument("--out", default=str(ROOT / "tools/bench/results/modular.json"))
    args = ap.parse_args()

    import shutil

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    d, seq, bs = args.d_model, args.seq_len, args.batch_size
    tok = ByteTokenizer()
    data = data_lib.TokenData.build(
        data_lib.read_texts(data_lib.default_corpus_paths(), int(args.max_data_mb * 1e6)), tok
    )
    ev = dict(batch_size=bs, seq_len=seq, batches=8, seed=0)
    lr, warmup = 1e-2, 20

    # --- the base pathway, trained end to end ----------------------------------------------
    spec = spec_lib.from_dict(base_spec(d, seq))
    base = LocalExecutor(spec)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=bs,
        seq_len=seq,
        lr=lr,
        warmup=warmup,
        eval_every=args.steps,
        eval_batches=4,
        save_every=args.steps,
    )
    t0 = time.perf_counter()
    LocalTrainer(base, "full", cfg, data, work / "teacher", tok).run()
    teacher_s = time.perf_counter() - t0
    print(f"base pathway: {args.steps} steps in {teacher_s:.1f} s", flush=True)

    # --- compositions over the shared modules ------------------------------------------------
    comps = {  # the table's label -> (pathway name, its modules)
        "full (4 attn)": ("depth-4", ["embed", *ATTN, "head"]),
        "3 attn": ("depth-3", ["embed", "attn-0", "attn-1", "attn-2", "head"]),
        "2 attn": ("depth-2", ["embed", "attn-0", "attn-1", "head"]),
        "1 attn": ("depth-1", ["embed", "attn-0", "head"]),
        "0 attn": ("depth-0", ["embed", "head"]),
    }
    shared = spec
    for name, chain in comps.values():
        shared = shared.with_pathway(name, chain)
    ex = LocalExecutor(shared, states={n: base.state(n) for n in spec.modules})
    rows = [row(label, ex, name, data, ev) for label, (name, _) in comps.items()]

    grown_spec, new_state = surgery.insert_attention(spec, "full", "attn-new", 5, seed=1)
    grown = LocalExecutor(
        grown_spec, states={**{n: base.state(n) for n in spec.modules}, "attn-new": new_state}
    )
    gcfg = TrainConfig(
        steps=args.steps // 2,
        batch_size=bs,
        seq_len=seq,
        lr=2e-2,
        warmup=5,
        eval_every=args.steps,
        eval_batches=2,
        save_every=args.steps,
        seed=1,
    )
    LocalTrainer(
        grown,
        "full",
        gcfg,
        data,
        work / "grown",
        tok,
        engine="pipeline",
        n_micro=2,
        trainable={"attn-new"},
    ).run()
    rows.append(row(f"full + attn-new (trained alone {gcfg.steps} steps)", grown, "full", data, ev))

    # --- module-wise (parallel) against end-to-end training ---------------------------------
    student = base_spec(d, seq, d_ff=2 * d)
    req = dict(
        teacher=str(work / "teacher"),
        student_spec=student,
        store=str(work / "store"),
        max_data_mb=args.max_data_mb,
        rows=args.rows,
        seq_len=seq,
        shard_rows=256,
        steps=args.module_steps,
        batch_size=bs,
        lr=lr,
        warmup=warmup,
        eval_batches=8,
    )
    t0 = time.perf_counter()
    ensure_store(DistillRequest(out=str(work / "unused"), **req))
    record_s = time.perf_counter() - t0
    from pathways.coordinator.distill_client import distill, module_queues

    timing = []
    for w in args.workers:
        r = DistillRequest(out=str(work / f"student-w{w}"), **req)
        with coordinator(w, module_queues(r), work / f"broker-w{w}") as app:
            # A 2-step job first, so the worker's pool processes have imported jax (warm workers).
            distill(
                app,
                DistillRequest(out=str(work / f"warm-w{w}"), **{**req, "steps": 2, "warmup": 1}),
                timeout=3600,
            )
            t0 = time.perf_counter()
            result = distill(app, r, timeout=3600)
            job_s = time.perf_counter() - t0
        tasks = [t for t in result["tasks"] if "position" in t]
        # The training phase: first module task start to last module task end.
        wall = max(t["ended"] for t in tasks) - min(t["started"] for t in tasks)
        timing.append(
            {
                "method": "module-wise (coordinator)",
                "workers": w,
                "seconds": wall,
                "job_seconds": job_s,
                "steps": f"{args.module_steps} per module",
                "eval_loss": result["student"]["eval_loss"],
                "task_seconds_sum": sum(t["ended"] - t["started"] for t in tasks),
                "overlap": max(t["started"] for t in tasks) < min(t["ended"] for t in tasks),
            }
        )
        print(
            f"module-wise, {w} workers: {wall:.1f} s -> eval {result['student']['eval_loss']:.3f}",
            flush=True,
        )
    target = max(t["eval_loss"] for t in timing)
    ecfg = TrainConfig(
        steps=args.e2e_max_steps, batch_size=bs, seq_len=seq, lr=lr, warmup=warmup, seed=0
    )
    secs, steps, loss = e2e_time_to(spec_lib.from_dict(student), data, target, ecfg, ev, every=25)
    timing.append(
        {
            "method": "end-to-end (fused, 1 process)",
            "workers": 1,
            "seconds": secs,
            "job_seconds": float("nan"),
            "steps": str(steps),
            "eval_loss": loss,
            "task_seconds_sum": secs,
            "overlap": False,
        }
    )
    print(
        f"end-to-end: {secs:.1f} s, {steps} steps -> eval {loss:.3f} (target {target:.3f})",
        flush=True,
    )

    _, _, distilled = load_checkpoint(work / f"student-w{args.workers[-1]}")
    rows.append(row("distilled student (d_ff 2d)", distilled, "full", data, ev))
    # The same student shape trained end to end for as many steps as the base pathway.
    e2e = LocalExecutor(spec_lib.from_dict(student))
    LocalTrainer(e2e, "full", cfg, data, work / "baseline", tok).run()
    rows.append(row(f"student shape, end to end ({args.steps} steps)", e2e, "full", data, ev))

    print()
    print_table(
        rows,
        [
            ("pathway", "pathway", ""),
            ("n_modules", "modules", "d"),
            ("params_mb", "params MB", ".3f"),
            ("kv_kib_per_token", "KV KiB/tok", ".2f"),
            ("eval_loss", "eval loss", ".3f"),
            ("perplexity", "ppl", ".2f"),
            ("decode_tok_s", "decode tok/s", ".0f"),
        ],
    )
    print()
    for r in rows:
        print(f"{r['pathway']}: {r['module_mb']}")
    print()
    print_table(
        timing,
        [
            ("method", "training", ""),
            ("workers", "workers", "d"),
            ("seconds", "train wall s", ".1f"),
            ("job_seconds", "job wall s", ".1f"),
            ("steps", "steps", ""),
            ("eval_loss", "eval loss", ".3f"),
            ("task_seconds_sum", "busy s (sum)", ".1f"),
            ("overlap", "overlap", ""),
        ],
    )
    png = plot(rows, Path(args.out).with_suffix(".png"))
    print(f"teacher: {teacher_s:.1f} s end to end; recording {args.rows} windows: {record_s:.1f} s")
    print(
        f"wrote {write_json(args.out, 'modular', rows, timing=timing, args=vars(args), teacher_seconds=teacher_s, record_seconds=record_s, devices=str(jax.devices()))} and {png}"
    )


if __name__ == "__main__":
    main()
