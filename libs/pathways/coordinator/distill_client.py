"""Client side of distillation jobs: submit one as record | chord(group, assemble), wait for it."""

from __future__ import annotations

from pathlib import Path

from celery import Celery, chain, chord, group
from celery.result import AsyncResult

from pathways import spec as spec_lib
from pathways.coordinator.app import DEFAULT_QUEUE
from pathways.coordinator.distill_tasks import MODULE_QUEUE
from pathways.distill.job import DistillRequest


def student_modules(req: DistillRequest) -> list[str]:
    """The student pathway's module names, in order (read from the request's student spec)."""
    spec = (
        spec_lib.from_dict(req.student_spec, source="student spec")
        if isinstance(req.student_spec, dict)
        else spec_lib.load(req.student_spec)
    )
    return list(spec.pathway(req.student_pathway or spec.default_pathway).modules)


def module_queues(req: DistillRequest) -> list[str]:
    """The queues a worker must consume to run every module task of `req` pinned."""
    return [MODULE_QUEUE.format(m) for m in student_modules(req)]


def submit_distillation(app: Celery, req: DistillRequest, *, pinned: bool = True) -> str:
    """Submits the job; returns the id of its final (assemble) result.

    The teacher is recorded by a first task unless the store is already complete (as seen from
    this machine).

    Args:
        pinned: route each module task to its queue `pathways.module.<name>`; otherwise every
            task goes to the default queue, where any worker takes it.
    """
    body = req.to_dict()
    tasks = [
        app.signature(
            "pathways.distill.module",
            args=(body, i),
            queue=MODULE_QUEUE.format(m) if pinned else DEFAULT_QUEUE,
            immutable=True,
        )
        for i, m in enumerate(student_modules(req))
    ]
    if req.baseline_steps:
        tasks.append(
            app.signature(
                "pathways.distill.baseline", args=(body,), immutable=True, queue=DEFAULT_QUEUE
            )
        )
    job = chord(
        group(tasks), app.signature("pathways.distill.assemble", args=(body,), queue=DEFAULT_QUEUE)
    )
    if not (Path(req.store) / "index.json").exists():
        # Recorded first. While the group is being sent the record task is not yet acknowledged
        # (late acks), so it holds one of the worker's prefetch slots: a worker needs one more
        # process than there are module tasks for them all to start at once.
        job = chain(
            app.signature(
                "pathways.distill.record", args=(body,), immutable=True, queue=DEFAULT_QUEUE
            ),
            job,
        )
    return job.apply_async().id


def wait_distillation(app: Celery, job_id: str, timeout: float | None = None) -> dict:
    """Blocks until the job's assemble task ends; returns its result (raises if any task failed)."""
    return AsyncResult(job_id, app=app).get(
        timeout=timeout, propagate=True, disable_sync_subtasks=False
    )


def distill(
    app: Celery, req: DistillRequest, *, pinned: bool = True, timeout: float | None = None
) -> dict:
    """Submits a distillation job and waits for its assembled, evaluated student."""
    return wait_distillation(app, submit_distillation(app, req, pinned=pinned), timeout)
