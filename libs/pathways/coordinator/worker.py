"""Runs a coordinator worker: `python -m pathways.coordinator.worker [--broker URL] [--queues Q]`."""

from __future__ import annotations

import argparse
import os

from pathways import paths, transport
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
    # Jobs dial module servers over TLS with this worker's certificate (read at the first job):
    # the choice is checked now (plaintext only with PATHWAYS_INSECURE=1).
    try:
        insecure = transport.check_choice()
        server_name = os.environ.get(transport.ENV_SERVER_NAME, "")
    except transport.TLSError as e:
        ap.error(str(e))
    try:  # where jobs may read and write, checked now rather than at the first job
        roots = paths.job_roots()
    except paths.PathError as e:
        ap.error(f"{paths.ENV_JOB_ROOTS}: {e}")
    print(f"coordinator worker: jobs read and write under {roots}")
    if insecure:
        transport.announce(transport.TLSConfig.plaintext(), "coordinator worker")
    elif server_name:
        print(f"coordinator worker: module certificates checked as {server_name!r}")
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
    """Starts a worker as a child process (tests, benchmarks); its output goes to `log` (an open
    file) or nowhere. Local deployments use `launcher.start_worker`, which keeps a log."""
    from pathways.deploy.launcher import start_worker

    out = log if log is not None else open(os.devnull, "wb")  # noqa: SIM115 (the child's copy)
    try:
        return start_worker(broker_url, concurrency=concurrency, queues=queues, log=out).proc
    finally:
        if log is None:
            out.close()


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
