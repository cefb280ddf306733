"""Control latency and episode throughput of robotics pathways acting through the services
(issue 20), beside the same policy in one process.

A checkpoint of examples/robotics.yaml (--checkpoint: a trained one; default: random weights,
as the control loop's cost does not depend on their values, only the episodes' lengths do) is
served by every module of the task's pathway in its own server process and a gateway, on
loopback, in plaintext and (--transports) with mutual TLS, as `pathways up` serves by default. A rollout is episodes of the simulator whose every control step is one
gateway Infer call (`pathways.client.Episode`: one observation in, one action out; the episode's
window of K = max_seq_len steps in the attention module's KV cache, re-prefilled once full). Per
step: the time from sending the observation to having the action (client, gateway, three module
hops). In process: the same policy over a LocalExecutor (`robotics.policy.Policy`, what
`pathways rollout --checkpoint` runs). Then 1, 4, 16 concurrent rollouts (threads of this
process, each its own gateway episode) for episodes/s and the step percentiles under load: the
gateway lines up the decode steps of concurrent episodes (lockstep wait, --lockstep-ms) and the
module servers batch them (--batch-wait-ms). Episodes with random weights run to the task's step
limit (Reacher: always 50 steps). After one warm-up episode per path (compiling). Prints a table
and writes JSON.

    PYTHONPATH=libs:.:build/gen python -m tools.bench.robotics_serving [--tasks reacher doorkey]
        [--episodes 4] [--concurrency 1 4 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tools.bench.common import dated_path, print_table, write_json

ROOT = Path(__file__).resolve().parents[2]
WARM_UP_SEED = 10**7


def _percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "step_ms_p50": float(np.percentile(ms, 50)),
        "step_ms_p99": float(np.percentile(ms, 99)),
        "steps": len(ms),
    }


def _paced(period_ms: float):
    """An on_step that holds a rollout's steps to one per `period_ms` (a control loop at a fixed
    rate: the processes idle between steps, as they do under a real robot); None: back to back."""
    if not period_ms:
        return None
    state = {"next": None}

    def on_step(env, action):
        now = time.perf_counter()
        state["next"] = max(state["next"] or now, now - period_ms / 1e3) + period_ms / 1e3
        time.sleep(max(0.0, state["next"] - time.perf_counter()))

    return on_step


def in_process(checkpoint: Path, task: str, episodes: int, period_ms: float = 0.0) -> dict:
    from pathways.robotics.policy import Policy, rollout
    from pathways.transcribe import load_executor

    policy = Policy(load_executor(checkpoint, task), task)
    rollout(task, policy, [WARM_UP_SEED])
    t0 = time.perf_counter()
    r = rollout(task, policy, range(episodes), on_step=_paced(period_ms))
    wall = time.perf_counter() - t0
    return {
        "task": task,
        "path": "in process",
        "transport": "-",
        "concurrent": 1,
        "episodes": episodes,
        "episodes_per_s": episodes / wall,
        "mean_steps": r.mean_steps,
        **_percentiles(r.step_seconds),
    }


def through_gateway(
    address: str,
    task: str,
    episodes: int,
    concurrent: int,
    tls=None,
    transport: str = "plaintext",
    period_ms: float = 0.0,
) -> dict:
    """`concurrent` threads, each rolling out `episodes` episodes (its own seeds) through the
    gateway; all start together after their warm-up."""
    from pathways.client import Client
    from pathways.robotics.policy import rollout

    results, errors = [None] * concurrent, []
    ready, go = threading.Barrier(concurrent + 1), threading.Event()

    def run(i: int) -> None:
        try:
            with Client(address, tls=tls, timeout=120) as c:
                episode = c.episode(task)
                rollout(task, episode, [WARM_UP_SEED + i])
                ready.wait()
                go.wait()
                seeds = range(i * episodes, (i + 1) * episodes)
                results[i] = rollout(task, episode, seeds, on_step=_paced(period_ms))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            ready.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(concurrent)]
    for t in threads:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:  # a rollout failed while warming up
        go.set()
        for t in threads:
            t.join()
        raise errors[0] from None
    t0 = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    steps = [s for r in results for s in r.step_seconds]
    return {
        "task": task,
        "path": "gateway",
        "transport": transport,
        "concurrent": concurrent,
        "episodes": episodes * concurrent,
        "episodes_per_s": episodes * concurrent / wall,
        "mean_steps": float(np.mean([r.mean_steps for r in results])),
        **_percentiles(steps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["reacher", "doorkey"])
    ap.add_argument("--checkpoint", default=None, help="a trained checkpoint (default: random)")
    ap.add_argument("--episodes", type=int, default=4, help="per rollout (thread)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--lockstep-ms", type=float, default=20.0, help="the gateway's (default)")
    ap.add_argument("--batch-wait-ms", type=float, default=None, help="module servers' (default)")
    ap.add_argument(
        "--transports",
        nargs="+",
        choices=["plaintext", "tls"],
        default=["plaintext"],
        help="tls: every process with its own certificate, clients checked (mutual TLS)",
    )
    ap.add_argument(
        "--period-ms",
        type=float,
        default=0.0,
        help="one control step per PERIOD ms (e.g. 20: a 50 Hz loop; 0: steps back to back)",
    )
    ap.add_argument("--out", default=None, help="JSON path (default: a dated file in results/)")
    args = ap.parse_args()

    from pathways import certs
    from pathways import checkpoint as ckpt
    from pathways import spec as spec_lib
    from pathways.deploy import launcher
    from pathways.serving import testing
    from pathways.serving.settings import ModuleServerSettings

    out = args.out or dated_path(ROOT / "tools/bench/results", "robotics_serving")
    batch_wait_ms = args.batch_wait_ms
    if batch_wait_ms is None:
        batch_wait_ms = next(
            f.default for f in dataclasses.fields(ModuleServerSettings) if f.name == "batch_wait_ms"
        )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-robotics-serving-") as tmp:
        checkpoint = Path(args.checkpoint or Path(tmp) / "ckpt")
        if not args.checkpoint:
            spec = spec_lib.load(ROOT / "examples/robotics.yaml")
            testing.make_checkpoint(checkpoint, spec)
        for task in args.tasks:
            rows.append(in_process(checkpoint, task, args.episodes, args.period_ms))
            print(rows[-1], flush=True)
            spec, _ = ckpt.load_spec(checkpoint)
            for transport in args.transports:
                tls_dir = Path(tmp) / "tls" if transport == "tls" else None
                fleet = launcher.Fleet(
                    str(checkpoint),
                    spec.pathway(task).modules,
                    module_args=["--batch-wait-ms", str(batch_wait_ms)],
                    gateway_args=["--lockstep-ms", str(args.lockstep_ms)],
                    identities=certs.Identities(tls_dir),
                )
                with fleet:
                    for n in args.concurrency:
                        rows.append(
                            through_gateway(
                                fleet.gateway.address,
                                task,
                                args.episodes,
                                n,
                                tls=fleet.client_tls,
                                transport=transport,
                                period_ms=args.period_ms,
                            )
                        )
                        print(rows[-1], flush=True)
            write_json(
                out,
                "robotics_serving",
                rows,
                args=vars(args),
                lockstep_ms=args.lockstep_ms,
                batch_wait_ms=batch_wait_ms,
            )
    print_table(
        rows,
        [
            ("task", "task", ""),
            ("path", "path", ""),
            ("transport", "transport", ""),
            ("concurrent", "rollouts", "d"),
            ("episodes", "episodes", "d"),
            ("mean_steps", "steps/ep", ".0f"),
            ("step_ms_p50", "p50 ms", ".2f"),
            ("step_ms_p99", "p99 ms", ".2f"),
            ("episodes_per_s", "episodes/s", ".2f"),
        ],
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
