"""Pipeline schedules: per-stage op lists over micro-batches (GPipe fill-drain and 1F1B)."""

from __future__ import annotations

from typing import Literal

Op = tuple[Literal["F", "B"], int]  # (forward | backward, micro-batch index)

SCHEDULES = ("gpipe", "1f1b")


def stage_ops(schedule: str, stage: int, n_stages: int, n_micro: int) -> list[Op]:
    """The order in which one stage runs its forwards and backwards for one training step.

    GPipe runs every forward, then every backward: every micro-batch's activations are alive at
    once. 1F1B runs (n_stages - stage - 1) warm-up forwards, then alternates one forward and one
    backward, so a stage holds at most n_stages - stage micro-batches of activations.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if n_micro < 1:
        raise ValueError(f"micro-batches must be >= 1, got {n_micro}")
    if schedule == "gpipe":
        return [("F", m) for m in range(n_micro)] + [("B", m) for m in range(n_micro)]
    warmup = min(n_stages - stage - 1, n_micro)
    ops: list[Op] = [("F", m) for m in range(warmup)]
    f, b = warmup, 0
    while b < n_micro:
        if f < n_micro:
            ops.append(("F", f))
            f += 1
        ops.append(("B", b))
        b += 1
    return ops


def bubble_fraction(n_stages: int, n_micro: int) -> float:
    """GPipe's idle fraction (K - 1) / (M + K - 1) for K stages and M micro-batches."""
    return (n_stages - 1) / (n_micro + n_stages - 1)
