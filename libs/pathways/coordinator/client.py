"""Client side of the coordinator: submit, follow, list, inspect and cancel training jobs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

from celery import Celery

from pathways.coordinator.jobs import JobRequest
from pathways.coordinator.tasks import CANCEL_KEY, CANCELLED, JOBS_KEY

FINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED", CANCELLED)


class JobClient:
    def __init__(self, app: Celery):
        self.app = app
        self.redis = app.backend.client

    def submit(self, req: JobRequest, queue: str | None = None) -> str:
        """Submits a training job (or another kind of job whose request names its `task`, e.g.
        `DiLoCoRequest`); returns its id."""
        task = getattr(req, "task", "pathways.train")
        result = self.app.send_task(task, args=[req.to_dict()], queue=queue)
        self.redis.hset(
            JOBS_KEY, result.id, json.dumps({"submitted": time.time(), "request": req.to_dict()})
        )
        return result.id

    def _known(self, job_id: str) -> dict:
        raw = self.redis.hget(JOBS_KEY, job_id)
        if raw is None:
            raise KeyError(f"unknown job {job_id!r} (see `pathways jobs list`)")
        return json.loads(raw)

    def status(self, job_id: str) -> dict:
        known = self._known(job_id)
        # State and result from one read of the backend: `AsyncResult.state` and `.info` each read
        # it again, so a job that ends between the two reads looked FAILED with its progress dict.
        meta = self.app.backend.get_task_meta(job_id)
        info = meta.get("result")
        out = {
            "id": job_id,
            "state": meta.get("status", "PENDING"),
            "submitted": known["submitted"],
            "out": known["request"]["out"],
            "steps": known["request"]["steps"],
        }
        if isinstance(info, BaseException):
            out["error"] = f"{type(info).__name__}: {info}"
        elif isinstance(info, dict):
            out.update({k: v for k, v in info.items() if k not in ("id",)})
        return out

    def list(self) -> list[dict]:
        ids = [k.decode() if isinstance(k, bytes) else k for k in self.redis.hkeys(JOBS_KEY)]
        jobs = [self.status(i) for i in ids]
        return sorted(jobs, key=lambda j: j["submitted"])

    def cancel(self, job_id: str) -> None:
        """Stops a job at its next step boundary (its last checkpoint stays intact)."""
        self._known(job_id)
        self.redis.set(CANCEL_KEY.format(job_id), 1, ex=7 * 24 * 3600)
        self.app.control.revoke(job_id)  # a job still queued never starts

    def follow(
        self,
        job_id: str,
        poll: float = 0.5,
        timeout: float | None = None,
        on_progress: Callable[[dict], None] | None = None,
    ) -> dict:
        """Polls until the job ends; returns its final status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for st in self.watch(job_id, poll):
            if on_progress:
                on_progress(st)
            if st["state"] in FINAL_STATES:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {st['state']} after {timeout} s")
        raise AssertionError("unreachable")

    def watch(self, job_id: str, poll: float = 0.5) -> Iterator[dict]:
        last = None
        while True:
            st = self.status(job_id)
            key = (st["state"], st.get("step"))
            if key != last:
                yield st
                last = key
            if st["state"] in FINAL_STATES:
                return
            time.sleep(poll)
