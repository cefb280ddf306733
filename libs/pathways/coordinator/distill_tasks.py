"""Celery tasks of blockwise distillation: record, one task per student module, assemble.

A job is `record | chord(group(module tasks [+ baseline]), assemble)`. Module tasks go to
per-module queues `pathways.module.<name>` (a deployment pins a module to the workers consuming
its queue) or, unpinned, to the default queue. Each task's result carries its wall-clock start and
end, its pid and host, so concurrency is visible in the results. Heavy imports (jax) happen inside
the tasks, after the fork.
"""

from __future__ import annotations

import os
import socket
import time

from celery import shared_task

MODULE_QUEUE = "pathways.module.{}"


def _where(task) -> dict:
    info = task.request.delivery_info or {}
    return {
        "pid": os.getpid(),
        "hostname": task.request.hostname or socket.gethostname(),
        "queue": info.get("routing_key"),
    }


def _checked(req):
    """The request, once its paths are under the worker's job roots (paths.check_job)."""
    from pathways import paths

    paths.check_job(req)
    return req


@shared_task(bind=True, name="pathways.distill.record")
def record(self, request: dict) -> dict:
    """Records the teacher's boundaries into the request's store (no-op if it is complete)."""
    from pathways.distill.job import DistillRequest, ensure_store

    return {**ensure_store(_checked(DistillRequest.from_dict(request))), **_where(self)}


@shared_task(bind=True, name="pathways.distill.module")
def train_module(self, request: dict, position: int) -> dict:
    """Trains the student module at `position` alone and saves it into the student checkpoint."""
    started = time.time()  # before the imports: a cold pool process pays for jax here
    from pathways.distill.job import DistillRequest, train_position

    out = train_position(_checked(DistillRequest.from_dict(request)), position)
    return {**out, "started": started, **_where(self)}


@shared_task(bind=True, name="pathways.distill.baseline")
def train_baseline(self, request: dict) -> dict:
    """Trains the end-to-end baseline of the student's shape (skipped if it is already there)."""
    from pathways.distill.job import DistillRequest
    from pathways.distill.job import train_baseline as run

    return {**run(_checked(DistillRequest.from_dict(request))), **_where(self)}


@shared_task(bind=True, name="pathways.distill.assemble")
def assemble(self, results: list[dict], request: dict) -> dict:
    """Chord callback: assembles the student checkpoint and evaluates it end to end."""
    from pathways.distill.job import DistillRequest, assemble_and_evaluate

    out = assemble_and_evaluate(_checked(DistillRequest.from_dict(request)), results)
    return {**out, "tasks": results, "assembled_by": _where(self)}
