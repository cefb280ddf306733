"""Celery tasks of DiLoCo jobs: the job (rounds, outer step, checkpoint) and one task per worker.

The job's task runs each round as a group of K worker tasks (each in its own pool process, on
any worker of the queue), waits for them, then takes the outer step per module and commits the
round (`parallel/diloco_job.py`). It holds one pool process while it waits, so the workers of the
queue need at least K + 1 processes between them; the job checks that before its first round.
Progress, cancel and resume work as for `pathways.train` jobs: PROGRESS state per round, the
cancel flag stops the workers between inner steps and the job at the round's end, and a job
resubmitted with the same `out` (or redelivered after its process died) resumes at the last
committed round. Heavy imports (jax) happen inside the tasks, after the fork.
"""

from __future__ import annotations

import os
import time

from celery import group, shared_task
from celery.exceptions import Ignore

from pathways.coordinator.tasks import CANCEL_KEY, CANCELLED

WORKER_TASK = "pathways.diloco.worker"


def _pool_processes(app) -> int | None:
    """Pool processes of the workers answering within a second (None: none answered)."""
    stats = app.control.inspect(timeout=1.0).stats() or {}
    sizes = [s.get("pool", {}).get("max-concurrency") for s in stats.values()]
    return sum(s for s in sizes if isinstance(s, int)) if stats else None


@shared_task(bind=True, name="pathways.diloco")
def diloco(self, request: dict) -> dict:
    """Runs (or resumes) a DiLoCo job, reporting each round as the task's PROGRESS state."""
    from pathways.parallel.diloco_job import DiLoCoRequest, DiLoCoRun

    req = DiLoCoRequest.from_dict(request)
    redis = self.app.backend.client
    job_id = self.request.id

    def cancelled() -> bool:
        return bool(redis.exists(CANCEL_KEY.format(job_id)))

    have = _pool_processes(self.app)
    if have is not None and have < req.workers + 1:
        raise ValueError(
            f"a DiLoCo job with {req.workers} workers needs {req.workers + 1} coordinator worker "
            f"processes (one waits for the rounds); the queue's workers have {have}: start "
            f"workers with more --concurrency"
        )
    run = DiLoCoRun(req)
    resumed_from = run.start()
    started, stopped, history = time.time(), False, []
    while run.round < run.rounds and not stopped:
        if cancelled():
            stopped = True
            break
        t0 = time.perf_counter()
        pending = group(
            [
                self.app.signature(
                    WORKER_TASK, args=(request, run.round, k, run.positions[k], job_id)
                )
                for k in range(req.workers)
            ]
        ).apply_async()
        deadline = time.monotonic() + req.round_timeout
        while not pending.ready():
            if time.monotonic() > deadline:
                pending.revoke()
                raise TimeoutError(
                    f"round {run.round}: {pending.completed_count()} of {req.workers} workers "
                    f"reported within round_timeout {req.round_timeout} s"
                )
            time.sleep(0.05)
        results = pending.get(propagate=True, disable_sync_subtasks=False)
        pending.forget()
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
                "worker_pids": [res["pid"] for res in results],
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


@shared_task(bind=True, name=WORKER_TASK)
def worker(self, request: dict, r: int, k: int, position: int, job_id: str) -> dict:
    """Worker k's round r (see `diloco_job.worker_round`); stops early if the job is cancelled."""
    from pathways.parallel.diloco_job import DiLoCoRequest, worker_round

    redis = self.app.backend.client
    out = worker_round(
        DiLoCoRequest.from_dict(request),
        r,
        k,
        position,
        should_stop=lambda: bool(redis.exists(CANCEL_KEY.format(job_id))),
    )
    return {**out, "pid": os.getpid()}
