"""Celery tasks of DiLoCo and DiPaCo jobs: the job (rounds, outer step, checkpoint) and one task per
worker (DiPaCo: per path).

The job's task runs each round as a group of K worker tasks (each in its own pool process, on
any worker of the queue), waits for them, then takes the outer step per module and commits the
round (`parallel/diloco_job.py`). It holds one pool process while it waits, so the workers of the
queue need at least K + 1 processes between them; the job checks that before its first round.
Progress, cancel and resume work as for `pathways.train` jobs: PROGRESS state per round, the
cancel flag stops the workers between inner steps and the job at the round's end, and a job
resubmitted with the same `out` (or redelivered after its process died) resumes at the last
committed round. A DiPaCo job (`parallel/dipaco_job.py`) is the same loop over its paths.
Heavy imports (jax) happen inside the tasks, after the fork.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

from celery import group, shared_task
from celery.exceptions import Ignore

from pathways.coordinator.tasks import CANCEL_KEY, CANCELLED

log = logging.getLogger(__name__)


def _pool_processes(app) -> int | None:
    """Pool processes of the workers answering within a second (None: none answered)."""
    stats = app.control.inspect(timeout=1.0).stats() or {}
    sizes = [s.get("pool", {}).get("max-concurrency") for s in stats.values()]
    return sum(s for s in sizes if isinstance(s, int)) if stats else None


@shared_task(bind=True, name="pathways.diloco")
def diloco(self, request: dict) -> dict:
    """Runs (or resumes) a DiLoCo job, reporting each round as the task's PROGRESS state."""
    from pathways.parallel.diloco_job import DiLoCoRequest

    return _run(self, DiLoCoRequest.from_dict(request))


@shared_task(bind=True, name="pathways.dipaco")
def dipaco(self, request: dict) -> dict:
    """Runs (or resumes) a DiPaCo job: its paths' workers as a DiLoCo job's."""
    from pathways.parallel.dipaco_job import DiPaCoRequest

    return _run(self, DiPaCoRequest.from_dict(request))


def _run(self, req) -> dict:
    from pathways import paths

    paths.check_job(req)  # before anything is read or written
    request = req.to_dict()
    redis = self.app.backend.client
    job_id = self.request.id

    def cancelled() -> bool:
        return bool(redis.exists(CANCEL_KEY.format(job_id)))

    have = _pool_processes(self.app)
    if have is not None and have < req.workers + 1:
        raise ValueError(
            f"a {req.title} job with {req.workers} workers needs {req.workers + 1} coordinator "
            f"worker processes (one waits for the rounds); the queue's workers have {have}: "
            f"start workers with more --concurrency"
        )
    run = req.build_run()
    resumed_from = run.start()
    started, stopped, history = time.time(), False, []
    while run.round < run.rounds and not stopped:
        if cancelled():
            stopped = True
            break
        t0 = time.perf_counter()
        attempt = uuid.uuid4().hex  # this launch of the round (a redelivered task is the same)
        pending = group(
            [
                self.app.signature(
                    req.worker_task, args=(request, run.round, k, run.positions[k], job_id, attempt)
                )
                for k in range(req.workers)
            ]
        ).apply_async()
        results = _collect(pending, req, run.round)
        if any(r.get("cancelled") for r in results) or cancelled():
            stopped = True
            break
        rec = run.finish_round(results, time.perf_counter() - t0)
        history.append(rec)
        self.update_state(
            state="PROGRESS",
            meta={
                **rec,
                "steps": req.steps,
                "rounds": run.rounds,
                "pid": os.getpid(),
                "resumed_from": resumed_from,
                "out": req.out,
                "worker_pids": [res["pid"] for res in results if "pid" in res],
            },
        )
    summary = {
        "step": run.round * req.inner_steps,
        "steps": req.steps,
        "round": run.round,
        "rounds": run.rounds,
        "out": req.out,
        "resumed_from": resumed_from,
        "seconds": time.time() - started,
        "loss": history[-1]["loss"] if history else None,
        "eval_loss": next((r["eval_loss"] for r in reversed(history) if "eval_loss" in r), None),
        "bytes": run.bytes,
    }
    if stopped:
        run.save_modules()  # the last committed round, as the run's ordinary checkpoint
        self.update_state(state=CANCELLED, meta={**summary, "cancelled": True})
        raise Ignore()
    return summary


def _collect(pending, req, r: int) -> list[dict]:
    """The round's worker results, once every task has finished, or at the round's deadline
    (`round_deadline`, with at least one report) where the missing ones count as lost. A task
    that failed is lost too (logged), unless every one did: then the job fails with its error."""
    started = time.monotonic()
    tasks = pending.results
    while True:
        done = [t.ready() for t in tasks]
        if all(done):
            break
        elapsed = time.monotonic() - started
        reported = sum(1 for t, d in zip(tasks, done) if d and t.successful())
        if req.round_deadline and elapsed > req.round_deadline and reported:
            break
        if elapsed > req.round_timeout:
            pending.revoke()
            raise TimeoutError(
                f"round {r}: {sum(done)} of {req.workers} workers reported within "
                f"round_timeout {req.round_timeout} s"
            )
        time.sleep(0.05)
    results, errors = [], []
    for k, t in enumerate(tasks):
        if t.ready() and t.successful():
            results.append(t.result)
            continue
        if t.ready():
            errors.append(t.result)
            log.warning("round %d: worker %d failed: %r", r, k, t.result)
        else:
            t.revoke()  # past the deadline: whatever it still uploads is not read
            log.warning("round %d: worker %d missed the round's deadline", r, k)
        results.append({"worker": k, "round": r, "lost": True})
    pending.forget()
    if errors and len(errors) == len(tasks):
        raise errors[0] if isinstance(errors[0], BaseException) else RuntimeError(errors[0])
    return results


@shared_task(bind=True, name="pathways.diloco.worker")
def worker(
    self, request: dict, r: int, k: int, position: int, job_id: str, attempt: str = ""
) -> dict:
    """Worker k's round r (see `diloco_job.worker_round`); stops early if the job is cancelled."""
    from pathways.parallel.diloco_job import DiLoCoRequest

    return _worker_round(self, DiLoCoRequest.from_dict(request), r, k, position, job_id, attempt)


@shared_task(bind=True, name="pathways.dipaco.worker")
def path_worker(
    self, request: dict, r: int, k: int, position: int, job_id: str, attempt: str = ""
) -> dict:
    """Path k's round r of a DiPaCo job."""
    from pathways.parallel.dipaco_job import DiPaCoRequest

    return _worker_round(self, DiPaCoRequest.from_dict(request), r, k, position, job_id, attempt)


def _worker_round(self, req, r: int, k: int, position: int, job_id: str, attempt: str) -> dict:
    from pathways.parallel.diloco_job import worker_round

    redis = self.app.backend.client
    out = worker_round(
        req,
        r,
        k,
        position,
        should_stop=lambda: bool(redis.exists(CANCEL_KEY.format(job_id))),
        attempt=attempt,
    )
    return {**out, "pid": os.getpid()}
