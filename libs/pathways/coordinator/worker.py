"""Runs a coordinator worker: `python -m pathways.coordinator.worker [--broker URL] [--queues Q]`."""

from __future__ import annotations

import argparse
import os

from pathways.coordinator.app import DEFAULT_QUEUE, make_app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--broker", default=None, help="Redis URL (default: $PATHWAYS_BROKER_URL)")
    ap.add_argument("--queues", default=os.environ.get("PATHWAYS_QUEUES", DEFAULT_QUEUE))
    ap.add_argument(
        "--concurrency", type=int, default=int(os.environ.get("PATHWAYS_CONCURRENCY", "1"))
    )
    ap.add_argument("--hostname", default=None)
    ap.add_argument("--loglevel", default="INFO")
    args = ap.parse_args(argv)
    app = make_app(args.broker)
    cmd = [
        "worker",
        "--pool=prefork",
        f"--concurrency={args.concurrency}",
        "-Q",
        args.queues,
        f"--loglevel={args.loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    if args.hostname:
        cmd.append(f"--hostname={args.hostname}")
    app.worker_main(cmd)


if __name__ == "__main__":
    main()


def spawn(broker_url: str, *, concurrency: int = 1, queues: str | None = None, log=None):
    """Starts a worker as a child process (tests, benchmarks, local deployments)."""
    import subprocess
    import sys

    from pathways.serving.launcher import child_env

    argv = [
        sys.executable,
        "-m",
        "pathways.coordinator.worker",
        "--loglevel=WARNING",
        f"--concurrency={concurrency}",
    ]
    if queues:
        argv += ["--queues", queues]
    out = log if log is not None else subprocess.DEVNULL
    return subprocess.Popen(
        argv,
        env=child_env({"PATHWAYS_BROKER_URL": broker_url}),
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def stop(proc, timeout: float = 30.0) -> None:
    """Warm shutdown (a running job is requeued, not lost); killed if it lingers."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
