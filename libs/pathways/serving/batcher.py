"""Continuous batching: one worker thread owns the module's device state and runs queued work.

Decode steps from different sessions that are queued together run as one batched step (up to
`max_rows` rows, waiting at most `max_wait_s` for more); anything else (prefill, warm-up) runs
alone, in arrival order. The worker waits (at most `max_wait_s`) only for as many rows as there
are sessions decoding right now (seen within `active_window_s`), so concurrent sessions fall into
step and share batches while a lone session never waits. A call that finds the module idle and no
other session decoding runs at once on its own thread (two thread hand-offs fewer per step).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pathways.serving.errors import DeadlineExceeded


class _Job:
    __slots__ = ("fn", "step", "rows", "want_logits", "deadline", "future")

    def __init__(self, fn, step, rows, want_logits, deadline):
        self.fn, self.step, self.rows = fn, step, rows
        self.want_logits, self.deadline = want_logits, deadline
        self.future: Future = Future()


class Batcher:
    def __init__(
        self,
        run_decode: Callable[[list[Any], bool], list[Any]],
        max_rows: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] | None = None,
        active_window_s: float = 0.5,
    ):
        self._run_decode, self.max_rows, self.max_wait_s = run_decode, max_rows, max_wait_s
        self._on_batch, self.active_window_s = on_batch, active_window_s
        self._active: dict[Any, tuple[float, int]] = {}  # session key -> (last step time, rows)
        self._active_lock = threading.Lock()
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._pending: _Job | None = None
        self._busy = threading.Lock()  # held while anything runs on the module's state
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any], deadline: float | None = None) -> Any:
        """Runs fn() alone (on the worker, or here when idle) and returns its result."""
        job = _Job(fn, None, 0, False, deadline)
        if self._try_inline(lambda: self._run(job.future, fn, job)):
            return job.future.result()
        return self._wait(self._put(job), deadline)

    def decode(
        self, step: Any, rows: int, want_logits: bool, deadline: float | None = None, key=None
    ):
        """Queues one session's decode step; returns its share of the batched result.

        `key` identifies the session (for counting the sessions decoding now); None: anonymous.
        """
        key = object() if key is None else key
        with self._active_lock:
            self._active[key] = (time.monotonic(), rows)
        if self.expected_rows() <= rows:  # alone: latency matters, not batching
            out = self._decode_here([step], rows, want_logits, deadline)
            if out is not None:
                return out[0]
        return self._wait(self._put(_Job(None, step, rows, want_logits, deadline)), deadline)

    def decode_group(self, items: list[tuple[Any, int, Any]], want_logits: bool, deadline=None):
        """Decode steps of several sessions at once, (step, rows, key) each: one batch when they
        fit and the module is idle, else queued together (the worker batches them). Returns the
        results in order; a queued step that failed (its deadline passed, say) has its exception
        as its result instead."""
        now = time.monotonic()
        with self._active_lock:
            for _, rows, key in items:
                self._active[key] = (now, rows)
        total = sum(rows for _, rows, _ in items)
        if total <= self.max_rows:
            out = self._decode_here([step for step, _, _ in items], total, want_logits, deadline)
            if out is not None:
                return out
        jobs = [self._put(_Job(None, step, rows, want_logits, deadline)) for step, rows, _ in items]
        results = []
        for job in jobs:
            try:
                results.append(self._wait(job, deadline))
            except Exception as e:  # noqa: BLE001 - the step's own failure, as its result
                results.append(e)
        return results

    def _decode_here(self, steps: list, rows: int, want_logits: bool, deadline):
        """Runs `steps` as one batch on this thread if the module is idle, else returns None.
        No job, future or queue: every hand-off costs on a server that just woke up."""
        out = []

        def run():
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("deadline passed before the step ran")
            if self._on_batch is not None:
                self._on_batch(rows)
            out.append(self._run_decode(steps, want_logits))

        return out[0] if self._try_inline(run) else None

    def forget(self, key) -> None:
        """The session `key` will send no more steps (closed)."""
        with self._active_lock:
            self._active.pop(key, None)

    def expected_rows(self) -> int:
        """Rows of the sessions that sent a step within the active window (capped at max_rows)."""
        cutoff = time.monotonic() - self.active_window_s
        with self._active_lock:
            for k in [k for k, (t, _) in self._active.items() if t < cutoff]:
                del self._active[k]
            return min(self.max_rows, sum(r for _, r in self._active.values()))

    def _try_inline(self, run: Callable[[], None]) -> bool:
        if not self._q.empty() or self._pending is not None:
            return False
        if not self._busy.acquire(blocking=False):
            return False
        try:
            if not self._q.empty() or self._pending is not None:
                return False
            run()
            return True
        finally:
            self._busy.release()

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)

    def _put(self, job: _Job) -> _Job:
        self._q.put(job)
        return job

    @staticmethod
    def _wait(job: _Job, deadline: float | None):
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return job.future.result(timeout=timeout)
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded while queued or running") from None

    def _next(self, block: bool, timeout: float | None = None) -> _Job | None:
        if self._pending is not None:
            job, self._pending = self._pending, None
            return job
        try:
            return self._q.get(block=block, timeout=timeout)
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while True:
            job = self._next(block=True)
            if job is None:
                return
            with self._busy:
                self._work(job)

    def _work(self, job: _Job) -> None:
        if job.fn is not None:
            self._run(job.future, job.fn, job)
            return
        batch, rows = [job], job.rows
        target = self.expected_rows()
        until = time.monotonic() + self.max_wait_s
        while rows < self.max_rows:
            wait = until - time.monotonic()
            if wait > 0 and rows < target:
                nxt = self._next(block=True, timeout=wait)
            else:
                nxt = self._next(block=False)  # take what is queued, wait no more
            if nxt is None:
                break
            if (
                nxt.fn is not None
                or rows + nxt.rows > self.max_rows
                or nxt.want_logits != job.want_logits
            ):
                self._pending = nxt  # runs next, in order
                break
            batch.append(nxt)
            rows += nxt.rows
        self._run_batch(batch, rows)

    def _run(self, future: Future, fn, job: _Job) -> None:
        if job.deadline is not None and time.monotonic() > job.deadline:
            future.set_exception(DeadlineExceeded("deadline passed before the call ran"))
            return
        try:
            future.set_result(fn())
        except BaseException as e:  # the worker must survive anything a request triggers
            future.set_exception(e)

    def _run_batch(self, batch: list[_Job], rows: int) -> None:
        now = time.monotonic()
        live = [j for j in batch if j.deadline is None or now <= j.deadline]
        for j in batch:
            if j not in live:
                j.future.set_exception(DeadlineExceeded("deadline passed before the step ran"))
        if not live:
            return
        if self._on_batch is not None:
            self._on_batch(sum(j.rows for j in live))
        try:
            results = self._run_decode([j.step for j in live], live[0].want_logits)
        except BaseException as e:
            for j in live:
                j.future.set_exception(e)
            return
        for j, r in zip(live, results):
            j.future.set_result(r)
