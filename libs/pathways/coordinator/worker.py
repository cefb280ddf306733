"""Runs a coordinator worker: `python -m pathways.coordinator.worker [--broker URL] [--queues Q]`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pathways import paths, transport
from pathways.coordinator.app import DEFAULT_QUEUE, make_app

# Where this worker's jobs keep their compiled XLA programs (JAX's persistent compilation cache).
ENV_COMPILE_CACHE = "PATHWAYS_COMPILE_CACHE"


def use_compile_cache(directory: str | Path) -> Path:
    """Jobs run by this worker's pool processes (forked from it, started later) keep compiled
    programs in `directory`: a job's tasks, the rounds of a resumed job and the next job of the
    same shapes load them instead of compiling again (each task builds its executor anew, so
    without it every task compiles every program). Cached whatever their compile time."""
    path = Path(directory).absolute()
    path.mkdir(parents=True, exist_ok=True)
    settings = {
        "JAX_COMPILATION_CACHE_DIR": str(path),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    os.environ.update(settings)
    if "jax" in sys.modules:  # already imported: its config read the environment before
        import jax

        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--broker", default=None, help="Redis URL (default: $PATHWAYS_BROKER_URL)")
    ap.add_argument("--queues", default=os.environ.get("PATHWAYS_QUEUES", DEFAULT_QUEUE))
    ap.add_argument(
        "--concurrency", type=int, default=int(os.environ.get("PATHWAYS_CONCURRENCY", "1"))
    )
    ap.add_argument(
        "--compile-cache",
        default=os.environ.get(ENV_COMPILE_CACHE, ""),
        help=f"directory for the jobs' compiled XLA programs (default: ${ENV_COMPILE_CACHE}; "
        "none: every task compiles its programs)",
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
    if args.compile_cache:
        print(
            f"coordinator worker: compiled programs cached in {use_compile_cache(args.compile_cache)}"
        )
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


def spawn(
    broker_url: str,
    *,
    concurrency: int = 1,
    queues: str | None = None,
    log=None,
    compile_cache: str | Path | None = None,
):
    """Starts a worker as a child process (tests, benchmarks); its output goes to `log` (an open
    file) or nowhere; `compile_cache`: see `use_compile_cache`. Local deployments use
    `launcher.start_worker`, which keeps a log."""
    from pathways.deploy.launcher import start_worker

    out = log if log is not None else open(os.devnull, "wb")  # noqa: SIM115 (the child's copy)
    try:
        env = {ENV_COMPILE_CACHE: str(Path(compile_cache).absolute())} if compile_cache else None
        return start_worker(
            broker_url, concurrency=concurrency, queues=queues, log=out, env=env
        ).proc
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
