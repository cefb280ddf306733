"""Runs one training step over a chain of stages with a pipeline schedule.

Each stage runs its op list in its own thread, so different stages work on different
micro-batches at the same time (whether the stages are in this process or remote services).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from pathways.pipeline.schedule import stage_ops
from pathways.pipeline.stage import Stage


class PipelineError(RuntimeError):
    """A stage failed during a step; the message names the stage, the op and the micro-batch."""


def _ready(x):
    """Waits for an in-process stage's (asynchronously dispatched) result, so busy time is real."""
    return x.block_until_ready() if hasattr(x, "block_until_ready") else x


def split_micro(inputs: np.ndarray, targets: np.ndarray, n_micro: int):
    b = inputs.shape[0]
    if n_micro < 1 or b % n_micro:
        raise ValueError(f"batch size {b} is not divisible into {n_micro} micro-batches")
    return np.split(inputs, n_micro), np.split(targets, n_micro)


def run_step(
    stages: list[Stage],
    inputs: np.ndarray,
    targets: np.ndarray,
    n_micro: int,
    schedule: str = "1f1b",
    timeout: float = 600.0,
    apply: bool = True,
) -> dict:
    """Forward + backward of every micro-batch through `stages`, then each stage's apply.

    With apply=False the stages keep their accumulated gradients (for inspection).

    Returns {"loss", "stage_seconds": {name: busy seconds}, "wall_seconds", "grad_norms"}.
    """
    xs, ts = split_micro(inputs, targets, n_micro)
    k = len(stages)
    acts: dict[tuple[int, int], Future] = {
        (i, m): Future() for i in range(k + 1) for m in range(n_micro)
    }
    grads: dict[tuple[int, int], Future] = {
        (i, m): Future() for i in range(k + 1) for m in range(n_micro)
    }
    for m in range(n_micro):
        acts[(0, m)].set_result(xs[m])
        grads[(k, m)].set_result(np.float32(1.0 / n_micro))  # d(mean loss) / d(micro loss)
    losses = [0.0] * n_micro
    busy = [0.0] * k

    def run_stage(i: int) -> None:
        st = stages[i]
        for op, m in stage_ops(schedule, i, k, n_micro):
            src = acts[(i, m)] if op == "F" else grads[(i + 1, m)]
            value = src.result(timeout=timeout)
            t0 = time.perf_counter()
            try:
                if op == "F":
                    out = _ready(st.forward(m, value, ts[m] if i == k - 1 else None))
                    if i == k - 1:
                        losses[m] = float(out)
                    acts[(i + 1, m)].set_result(out)
                else:
                    grads[(i, m)].set_result(_ready(st.backward(m, value)))
            except Exception as e:
                err = PipelineError(f"stage {st.name!r} failed in {op}{m}: {e}")
                # Unblock every waiter so the step fails fast instead of hanging.
                for f in (*acts.values(), *grads.values()):
                    if not f.done():
                        f.set_exception(err)
                raise err from e
            busy[i] += time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=k, thread_name_prefix="stage") as pool:
        futures = [pool.submit(run_stage, i) for i in range(k)]
        errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        for st in stages:
            if hasattr(st, "reset"):
                st.reset()
        raise first
    norms = [float("nan")] * k
    if apply:
        with ThreadPoolExecutor(max_workers=k) as pool:
            norms = list(pool.map(lambda s: s.apply()["grad_norm"], stages))
    return {
        "loss": float(np.mean(losses)),
        "wall_seconds": time.perf_counter() - t0,
        "stage_seconds": {s.name: b for s, b in zip(stages, busy)},
        "grad_norms": {s.name: n for s, n in zip(stages, norms)},
    }
