"""Test helpers: a coordinator on an embedded broker with a real worker, and a job's records."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from pathways.coordinator.client import JobClient


@contextlib.contextmanager
def coordinator(workdir: str | Path, concurrency: int = 1) -> Iterator[JobClient]:
    """An embedded broker and one worker of `concurrency` pool processes; yields a client. The
    worker's jobs share one compilation cache under `workdir` (the file's jobs compile the same
    programs: 145 -> 95 s for tests/diloco_coordinator_test.py on this 2-core machine)."""
    from pathways.coordinator import worker
    from pathways.coordinator.app import make_app
    from pathways.coordinator.broker import EmbeddedBroker

    with EmbeddedBroker(workdir=workdir) as broker:
        proc = worker.spawn(
            broker.url, concurrency=concurrency, compile_cache=Path(workdir) / "xla-cache"
        )
        try:
            yield JobClient(make_app(broker.url))
        finally:
            worker.stop(proc)


def metrics(out: str | Path) -> list[dict]:
    """A run's metrics.jsonl records."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def wait_for_progress(client: JobClient, job_id: str, timeout: float = 180.0) -> dict:
    """The job's status once it reports progress (a round or step done); fails if it ends or
    waits longer than `timeout` first."""
    deadline = time.monotonic() + timeout
    while (st := client.status(job_id))["state"] != "PROGRESS":
        assert st["state"] in ("PENDING", "STARTED") and time.monotonic() < deadline, st
        time.sleep(0.02)
    return st


def cancel_and_resubmit(client: JobClient, req, timeout: float = 300.0) -> dict:
    """Submits a round-based job (DiLoCo, DiPaCo), cancels it once a round is committed, checks
    that it stopped inside the job, submits it again and returns the resumed job's final status
    (checked: it succeeded, resuming where the first stopped)."""
    first = client.submit(req)
    wait_for_progress(client, first)
    client.cancel(first)
    st = client.follow(first, timeout=timeout)
    assert st["state"] == "CANCELLED", st
    cut = st["round"]
    assert 1 <= cut < req.rounds, st
    final = client.follow(client.submit(req), timeout=timeout)
    assert final["state"] == "SUCCESS", final
    assert final["resumed_from"] == cut and final["round"] == req.rounds, final
    return final
