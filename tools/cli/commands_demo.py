"""`pathways demo`: the whole system on this machine, from nothing to generated text.

Starts a local deployment (every module its own server process, a gateway, an embedded broker and
a coordinator worker), trains the tiny example through the module services under the coordinator
with a live progress display, streams a generation from the trained modules through the gateway,
prints a summary and stops everything. Ctrl-C stops every process and keeps the last checkpoint.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from tools.cli.commands_local import EXAMPLES

BATCH = 16  # sequences of 128 tokens per training step


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train the tiny example through the module services under "
        "the coordinator, then generate from it via the gateway",
    )
    p.add_argument("--out", default="runs/demo", help="run directory (checkpoints, logs, plot)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default 500, ~2-3 min on 2 cores; speech 1,500, ~2.5 min: the "
        "demo says at start what they reach)",
    )
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument(
        "--local", action="store_true", help="no services: train and generate in this one process"
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC and no API keys (default: a private CA, a certificate per service "
        "and an admin API key under the run directory, mutual TLS between every process)",
    )
    p.add_argument(
        "--task",
        choices=["text", "vision", "speech", "robotics"],
        default="text",
        help="text: the tiny language model (default); vision: digits (examples/digits.yaml), "
        "classified through the gateway; speech: spoken words (examples/multitask.yaml's speech "
        "pathway; needs espeak-ng), transcribed through the gateway; robotics: DoorKey-8x8 "
        "(examples/robotics.yaml) learnt from its expert, then acted through the gateway (and "
        "a GIF of an episode)",
    )
    p.add_argument(
        "--examples",
        type=int,
        default=0,
        help="vision/speech: test examples sent through the gateway (0: the whole test split); "
        "robotics: episodes (0: 20)",
    )
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    if args.steps is None:
        from tools.cli import demo_tasks

        args.steps = demo_tasks.TASKS[args.task].steps if args.task != "text" else 500
    if args.task != "text":
        if args.local:
            raise ValueError("--local runs the text demo only; drop it for --task " + args.task)
        from tools.cli import demo_tasks

        return demo_tasks.run(args, follow)
    if args.local:
        from tools.cli.commands_local import build_args, cmd_generate, cmd_train

        out = str(Path(args.out) / "local")
        cmd_train(
            build_args(
                "train",
                ["--spec", str(EXAMPLES / "tiny.yaml"), "--out", out, "--steps", str(args.steps)],
            )
        )
        return cmd_generate(
            build_args(
                "generate",
                [
                    "--checkpoint",
                    out,
                    "--prompt",
                    args.prompt,
                    "--max-tokens",
                    str(args.max_tokens),
                    "--temperature",
                    "0.7",
                ],
            )
        )
    return run_distributed(args)


def initial_checkpoint(directory: Path) -> None:
    """Randomly initialised weights for every module of the tiny spec (made once)."""
    from pathways import checkpoint as ckpt
    from pathways import spec as spec_lib
    from pathways import tokenizers
    from pathways.executor.local import LocalExecutor

    if (directory / "spec.yaml").exists():
        return
    spec = spec_lib.load(EXAMPLES / "tiny.yaml")
    ex = LocalExecutor(spec, seed=0)
    ckpt.save_spec(directory, spec, tokenizers.ByteTokenizer())
    for name in spec.modules:
        ckpt.save_module(directory, name, ex.state(name))


def run_distributed(args) -> int:
    from tqdm import tqdm

    from pathways.coordinator.app import make_app
    from pathways.coordinator.client import JobClient
    from pathways.coordinator.jobs import JobRequest
    from pathways.deploy.local import LocalDeployment
    from tools.cli.commands_local import build_args
    from tools.cli.commands_serve import generate_via_gateway

    # Refuse bad settings before starting a single process.
    if args.steps <= 0:
        raise ValueError(f"--steps must be a positive integer, got {args.steps}")
    if args.micro_batches <= 0 or BATCH % args.micro_batches:
        raise ValueError(
            f"--micro-batches must divide the batch of {BATCH}, " f"got {args.micro_batches}"
        )
    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    trained = out / "checkpoint"
    # After an interrupted demo the servers start from its last checkpoint and the job resumes.
    serve_from = trained if (trained / "train" / "meta.json").exists() else out / "init"
    initial_checkpoint(out / "init")
    log_dir = out / "logs"
    stop = {"flag": False}

    def on_signal(*_):
        stop["flag"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    t_start = time.time()
    if args.insecure:
        print(
            "WARNING: --insecure: every process talks plaintext gRPC and the gateway takes no "
            "API keys",
            file=sys.stderr,
        )
    dep = LocalDeployment(
        serve_from,
        log_dir=log_dir,
        secure_dir=None if args.insecure else out,
        job_roots=[EXAMPLES],  # the job reads the example spec
    )
    print(
        f"starting a local deployment: {len(dep.modules)} module servers "
        f"({', '.join(dep.modules)}), a gateway, a broker and a coordinator worker "
        f"(logs: {log_dir})",
        file=sys.stderr,
    )
    job = None
    client = None
    try:
        dep.start()
        print(
            f"gateway {dep.gateway}; broker {dep.broker.shown_url} "
            f"({time.time() - t_start:.0f} s)",
            file=sys.stderr,
        )
        client = JobClient(make_app(dep.broker.url))
        req = JobRequest(
            spec=str(EXAMPLES / "tiny.yaml"),
            out=str(trained),
            steps=args.steps,
            batch_size=BATCH,
            seq_len=128,
            max_data_mb=2.0,
            eval_every=50,
            save_every=50,
            engine="services",
            schedule=args.schedule,
            micro_batches=args.micro_batches,
            modules=dep.train_modules,
        )
        job = client.submit(req)
        print(
            f"training job {job}: pathway 'tiny' through the module services, "
            f"{args.schedule} over {args.micro_batches} micro-batches",
            file=sys.stderr,
        )
        final = follow(client, job, req.steps, tqdm)
        if final["state"] != "SUCCESS":
            raise ValueError(f"training job {final['state'].lower()}: " f"{final.get('error', '')}")
        # The servers trained copies of their weights: serve what they learnt (the admin step
        # that changes served weights; the job's final checkpoint holds the same weights).
        published = dep.publish(trained)
        print(
            f"\npublished the trained checkpoint to {len(published)} module servers",
            file=sys.stderr,
        )
        print("\ngenerating through the gateway from the trained modules:\n", file=sys.stderr)
        generate_via_gateway(
            build_args(
                "generate",
                [
                    "--gateway",
                    dep.gateway,
                    "--prompt",
                    args.prompt,
                    "--max-tokens",
                    str(args.max_tokens),
                    "--temperature",
                    "0.7",
                    "--seed",
                    "1",
                ],
            )
        )
        summarize(trained, final, time.time() - t_start)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the job and every process...", file=sys.stderr)
        if job is not None and client is not None:
            try:
                client.cancel(job)
                client.follow(job, timeout=60)
            except Exception as e:  # noqa: BLE001 - shutting down regardless
                print(f"(job did not stop cleanly: {e})", file=sys.stderr)
            print(f"last checkpoint: {trained}", file=sys.stderr)
        return 130
    finally:
        dep.stop()


def follow(client, job: str, steps: int, tqdm) -> dict:
    bar = tqdm(total=steps, unit="step", dynamic_ncols=True, desc="queued")

    def progress(st):
        if st["state"] == "PROGRESS":
            bar.set_description("training")
            bar.n = st["step"]
            per = st.get("stage_seconds", {})
            post = {"loss": f"{st['loss']:.3f}", "tok/s": f"{st['tokens_per_s']:.0f}"}
            if "eval_loss" in st:
                post["eval"] = f"{st['eval_loss']:.3f}"
            if per:
                post["busiest"] = max(per, key=per.get)
            bar.set_postfix(post, refresh=False)
            bar.refresh()
        else:
            bar.set_description(st["state"].lower())

    try:
        final = client.follow(job, poll=0.3, on_progress=progress)
        bar.n = final.get("step", bar.n)
        bar.refresh()
        return final
    finally:
        bar.close()


def summarize(run: Path, final: dict, seconds: float) -> None:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    per_module: dict[str, float] = {}
    for r in recs:
        for m, s in r.get("stage_seconds", {}).items():
            per_module[m] = per_module.get(m, 0.0) + s
    toks = [r["tokens_per_s"] for r in recs]
    wire = sum(r.get("wire_bytes", 0) for r in recs)
    print("\nsummary", file=sys.stderr)
    print(
        f"  loss           {recs[0]['loss']:.3f} (step 1) -> {final['loss']:.3f} "
        f"(step {final['step']}); eval {final['eval_loss']:.3f} nats/byte"
    )
    print(f"  throughput     {sum(toks) / len(toks):,.0f} tokens/s (mean over steps)")
    print("  module time    " + ", ".join(f"{m} {s:.1f} s" for m, s in per_module.items()))
    print(
        f"  on the wire    {wire / 2**20:,.1f} MiB of activations and gradients "
        f"({wire / max(len(recs), 1) / 2**20:.2f} MiB per step)"
    )
    print(f"  loss plot      {final['loss_png']}")
    print(f"  checkpoint     {final['out']}  (total {seconds:.0f} s)")
