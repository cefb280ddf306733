"""Coordinator commands: `jobs list|status|cancel`, and `train --remote` (submit and follow)."""

from __future__ import annotations

import sys
from pathlib import Path

from pathways.deploy import local


def register(sub) -> None:
    p = sub.add_parser("jobs", help="list, inspect or cancel training jobs of the coordinator")
    p.add_argument("action", choices=["list", "status", "cancel"], nargs="?", default="list")
    p.add_argument("job_id", nargs="?")
    p.add_argument("--broker", help="coordinator broker URL (default: the running deployment)")
    p.set_defaults(func=cmd_jobs)


def client(broker: str | None):
    from pathways.coordinator.app import make_app
    from pathways.coordinator.client import JobClient

    url = local.broker_url(broker)
    c = JobClient(make_app(url))
    try:
        c.redis.ping()
    except Exception as e:  # redis raises its own ConnectionError/TimeoutError family
        raise ValueError(f"cannot reach the coordinator's broker at {url}: {e}") from None
    return c


def cmd_jobs(args) -> int:
    c = client(args.broker)
    if args.action == "list":
        jobs = c.list()
        if not jobs:
            print("no jobs")
        for j in jobs:
            step = f"{j.get('step', 0)}/{j['steps']}"
            loss = f"{j['loss']:.3f}" if isinstance(j.get("loss"), float) else "-"
            print(f"{j['id']}  {j['state']:<9} step {step:<11} loss {loss:<7} {j['out']}")
        return 0
    if not args.job_id:
        raise ValueError(f"jobs {args.action} needs a JOB_ID (see `pathways jobs list`)")
    if args.action == "status":
        st = c.status(args.job_id)
        for k, v in st.items():
            print(f"{k:>14}: {v}")
        return 0 if st["state"] != "FAILURE" else 1
    c.cancel(args.job_id)
    print(f"cancelling {args.job_id}: it stops after its current step; its checkpoint is kept")
    return 0


def submit_and_follow(args, modules: dict[str, str] | None = None) -> int:
    """`pathways train --remote`: submit to the coordinator and follow with a progress bar."""
    from pathways.coordinator.jobs import JobRequest

    info = local.read() or {}
    engine = args.engine or ("services" if info.get("train_modules") else "pipeline")
    serve_only = info.get("serve_only") or []
    if engine == "services" and not modules and serve_only:
        from pathways import spec as specs

        spec = specs.load(args.spec)
        used = set(spec.pathway(args.pathway or spec.default_pathway).modules)
        if used & set(serve_only):
            raise ValueError(
                f"the local deployment hosts {', '.join(m for m in serve_only if m in used)} "
                f"several modules to a server (up --colocate), which only serves: train with "
                f"--engine pipeline, or start `pathways up` without --colocate"
            )
    req = JobRequest(
        **_common_fields(args),
        warmup=args.warmup,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        engine=engine,
        schedule=args.schedule,
        micro_batches=args.micro_batches,
        modules=modules or (info.get("train_modules", {}) if engine == "services" else {}),
    )
    c = client(args.broker)
    job = c.submit(req)
    print(
        f"submitted job {job} ({engine}, {args.schedule}, {args.micro_batches} micro-batches)",
        file=sys.stderr,
    )
    final = follow(
        c,
        job,
        req.steps,
        "step",
        lambda st: {"loss": f"{st['loss']:.3f}", "tok/s": f"{st['tokens_per_s']:.0f}"},
        f"its last checkpoint is in {req.out}",
    )
    if final is None:
        return 130
    print(
        f"job {job} done in {final['seconds']:.0f} s: loss {final['loss']:.3f}, eval "
        f"{final['eval_loss']:.3f}; checkpoint {final['out']}, plot {final['loss_png']}"
    )
    return 0


def submit_parallel_and_follow(args) -> int:
    """`pathways train --parallel diloco|dipaco`: submit a DiLoCo or DiPaCo job to the
    coordinator and follow it."""
    from pathways.parallel.diloco_job import DiLoCoRequest
    from pathways.parallel.dipaco_job import DiPaCoRequest

    given = {
        "workers": args.workers,
        "inner_steps": args.inner_steps,
        "inner": args.inner_optimizer,
        "outer_lr": args.outer_lr,
        "outer_momentum": args.outer_momentum,
        "compress": args.compress,
        "round_deadline": args.round_deadline,
        "warmup": args.warmup,
    }
    cls = DiLoCoRequest
    if args.parallel == "dipaco":
        cls = DiPaCoRequest
        given.update(
            grid=parse_grid(args.grid) if args.grid else spec_grid(args.spec, args.pathway),
            router_checkpoint=(
                str(Path(args.router_checkpoint).absolute()) if args.router_checkpoint else None
            ),
            router_pathway=args.router_pathway,
            doc_len=args.doc_len,
            router_prefix=args.router_prefix,
        )
    h = args.inner_steps or cls.__dataclass_fields__["inner_steps"].default
    req = cls(
        **_common_fields(args),
        seed=args.seed,
        # --eval-every and --save-every count steps; a parallel job evaluates and saves at rounds.
        eval_every=max(1, args.eval_every // h) if h > 0 else 1,
        save_every=max(1, args.save_every // h) if h > 0 else 1,
        **{k: v for k, v in given.items() if v is not None},
    )
    c = client(args.broker)
    job = c.submit(req)
    workers = f"{req.workers} workers" if cls is DiLoCoRequest else f"{req.workers} paths"
    print(
        f"submitted {req.title} job {job}: {workers} x {req.rounds} rounds of "
        f"{req.inner_steps} inner steps ({req.inner}; outer lr {req.outer_lr}, momentum "
        f"{req.outer_momentum}; pseudo-gradients {req.compress})",
        file=sys.stderr,
    )
    final = follow(
        c,
        job,
        req.rounds,
        "round",
        lambda st: {
            "loss": f"{st['loss']:.3f}",
            "MB/worker": f"{st['bytes_per_worker'] / 1e6:.1f}",
        },
        f"its last round is in {req.out}",
    )
    if final is None:
        return 130
    moved = (final["bytes"]["upload"] + final["bytes"]["download"]) / 1e6
    print(
        f"job {job} done in {final['seconds']:.0f} s: loss {final['loss']:.3f}, eval "
        f"{final['eval_loss']:.3f}, {moved:.1f} MB exchanged; checkpoint {final['out']}"
    )
    return 0


def spec_grid(spec_path: str, pathway: str | None) -> dict[str, int]:
    """The `grid:` the spec declares for `pathway` (default: its first), for a DiPaCo job given
    no --grid."""
    from pathways import spec as spec_lib

    spec = spec_lib.load(spec_path)
    name = pathway or spec.default_pathway
    grid = dict(spec.pathway(name).grid)
    if not grid:
        raise ValueError(
            f"--parallel dipaco needs --grid MODULE=N[,MODULE=N...] or a grid: in pathway "
            f"{name!r} of {spec_path}"
        )
    return grid


def parse_grid(text: str | None) -> dict[str, int]:
    """`--grid attn-0=2,attn-1=2` -> {"attn-0": 2, "attn-1": 2} (in the order given)."""
    if not text:
        raise ValueError("--parallel dipaco needs --grid MODULE=N[,MODULE=N...]")
    grid = {}
    for part in text.split(","):
        name, sep, n = part.strip().partition("=")
        if not sep or not name or not n.strip().isdigit():
            raise ValueError(f"--grid must be MODULE=N[,MODULE=N...]; got {part.strip()!r}")
        grid[name] = int(n)
    return grid


def follow(c, job: str, total: int, unit: str, figures, kept: str) -> dict | None:
    """Shows a job's progress as a bar (`unit`: the progress field counted, "step" or "round";
    `figures(state)`: the figures shown beside it, eval loss added when there is one) until it
    ends. Ctrl-C cancels the job and returns None (`kept` says what is kept); a job that did not
    succeed is a ValueError naming its state and error."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, dynamic_ncols=True)

    def progress(st):
        if st["state"] == "PROGRESS":
            bar.n = st[unit]
            post = figures(st)
            if "eval_loss" in st:
                post["eval"] = f"{st['eval_loss']:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.refresh()
        else:
            bar.set_description(st["state"].lower())

    try:
        final = c.follow(job, on_progress=progress)
    except KeyboardInterrupt:
        bar.close()
        c.cancel(job)
        print(f"\ncancelled job {job}; {kept}", file=sys.stderr)
        return None
    bar.close()
    if final["state"] != "SUCCESS":
        raise ValueError(f"job {job} {final['state'].lower()}: {final.get('error', '')}".strip())
    return final


def _common_fields(args) -> dict:
    """What a training job and a DiLoCo job take alike from `pathways train`'s arguments (paths
    made absolute: the job runs in a worker with another working directory)."""
    return {
        "spec": str(Path(args.spec).absolute()),
        "out": str(Path(args.out).absolute()),
        "pathway": args.pathway,
        "data": tuple(str(Path(d).absolute()) for d in args.data or ()),
        "max_data_mb": args.max_data_mb,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
    }
