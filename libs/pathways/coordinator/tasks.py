"""Celery tasks of the coordinator. Heavy imports (jax) happen inside the task, after the fork."""

from __future__ import annotations

import json
import os
import time

from celery import shared_task
from celery.exceptions import Ignore

from pathways.coordinator.jobs import JobRequest
from pathways.coordinator.multitask_jobs import MultiTaskRequest

CANCEL_KEY = "pathways:cancel:{}"
# A job stopped by `cancel` while running (Celery's REVOKED must carry an exception).
CANCELLED = "CANCELLED"
JOBS_KEY = "pathways:jobs"


@shared_task(bind=True, name="pathways.train")
def train(self, request: dict) -> dict:
    """Runs (or resumes) a training job, reporting progress as the task's PROGRESS state."""
    req = JobRequest.from_dict(request)

    def build():
        from pathways.coordinator.runner import build_trainer

        return build_trainer(req)

    return _run(self, req, build, req.pathway or "")


@shared_task(bind=True, name="pathways.multitask")
def multitask(self, request: dict) -> dict:
    """Runs (or resumes) a multi-task job (`MultiTaskRequest`): its pathways in turn through
    the modules they share; progress, cancel and resume as for `pathways.train`."""
    req = MultiTaskRequest.from_dict(request)

    def build():
        from pathways.coordinator.multitask_jobs import build_multitask

        return build_multitask(req)

    return _run(self, req, build, "multi-task: " + ", ".join(t["pathway"] for t in req.tasks))


def _run(self, req, build, title: str) -> dict:
    from pathways import paths
    from pathways.coordinator.plot import plot_losses

    paths.check_job(req)  # before anything is read or written
    redis = self.app.backend.client
    trainer = build()
    resumed_from = trainer.step if trainer.try_resume() else 0
    started = time.time()
    cancelled = False

    def should_stop() -> bool:
        nonlocal cancelled
        cancelled = bool(redis.exists(CANCEL_KEY.format(self.request.id)))
        return cancelled

    def on_step(rec: dict) -> None:
        self.update_state(
            state="PROGRESS",
            meta={
                **rec,
                "steps": req.steps,
                "pid": os.getpid(),
                "resumed_from": resumed_from,
                "out": req.out,
            },
        )
        if "eval_loss" in rec or rec["step"] == req.steps:
            plot_losses(trainer.out / "metrics.jsonl", trainer.out / "loss.png", title)

    try:
        history = trainer.run(on_step=on_step, should_stop=should_stop)
    finally:
        close = getattr(trainer, "close", None) or getattr(trainer.engine, "close", None)
        if close:
            close()
    summary = {
        "step": trainer.step,
        "steps": req.steps,
        "out": req.out,
        "resumed_from": resumed_from,
        "seconds": time.time() - started,
        "loss": history[-1]["loss"] if history else None,
        "eval_loss": next((r["eval_loss"] for r in reversed(history) if "eval_loss" in r), None),
        "loss_png": str(trainer.out / "loss.png"),
    }
    for key in ("task_losses", "task_eval_losses"):  # multi-task jobs: each task's own
        last = next((r[key] for r in reversed(history) if key in r), None)
        if last is not None:
            summary[key] = last
    if cancelled:
        trainer.save()  # the checkpoint of the last finished step, intact
        if (trainer.out / "metrics.jsonl").exists():
            plot_losses(trainer.out / "metrics.jsonl", trainer.out / "loss.png")
        self.update_state(state=CANCELLED, meta={**summary, "cancelled": True})
        raise Ignore()
    (trainer.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
