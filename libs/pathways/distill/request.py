"""What a distillation job is given: the request (JSON-serialisable) and the per-module settings.

Light on purpose (no jax): clients build and send requests without loading the model stack.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pathways.config import positive_int, require, schedule, unknown_fields


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 20
    ce_weight: float = 0.0  # decoding only: weight of the cross-entropy to the true next tokens
    seed: int = 0

    def __post_init__(self):
        schedule(self.steps, self.lr, self.warmup)  # TrainConfig's, without importing jax
        positive_int("batch_size", self.batch_size)
        require(
            isinstance(self.ce_weight, int | float) and self.ce_weight >= 0,
            f"ce_weight must be >= 0, got {self.ce_weight!r}",
        )

    def train_config(self):
        from pathways.train import TrainConfig  # jax: not needed to build or send a request

        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup=self.warmup,
            seed=self.seed,
        )


@dataclasses.dataclass(frozen=True)
class DistillRequest:
    teacher: str  # teacher checkpoint directory
    student_spec: str | dict  # path of the student's spec YAML, or the spec as a mapping
    out: str  # the student's checkpoint directory
    store: str  # activation store directory; recorded first if it holds no store yet
    teacher_pathway: str | None = None
    student_pathway: str | None = None
    data: tuple[str, ...] = ()  # text files/folders; empty means the standard library sources
    max_data_mb: float = 4.0
    rows: int = 512  # teacher windows recorded
    seq_len: int = 64
    shard_rows: int = 256
    steps: int = 300  # per student module
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 20
    ce_weight: float = 0.0
    seed: int = 0
    eval_batches: int = 8
    # An end-to-end-trained model of the student's shape to compare against: evaluated if the
    # directory holds a checkpoint, else trained there for baseline_steps (0: no baseline).
    baseline: str | None = None
    baseline_steps: int = 0

    def __post_init__(self):
        self.distill_config()  # validates steps, batch size, lr, warmup, ce_weight
        for name in ("rows", "seq_len", "shard_rows", "eval_batches"):
            positive_int(name, getattr(self, name))
        if not isinstance(self.baseline_steps, int) or self.baseline_steps < 0:
            raise ValueError(f"baseline_steps must be >= 0, got {self.baseline_steps!r}")
        object.__setattr__(self, "data", tuple(self.data))

    def distill_config(self) -> DistillConfig:
        return DistillConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup=self.warmup,
            ce_weight=self.ce_weight,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"] = list(self.data)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> DistillRequest:
        unknown = unknown_fields(DistillRequest, d)
        if unknown:
            raise ValueError(f"unknown distillation field(s) {', '.join(unknown)}")
        return DistillRequest(**d)

    @property
    def baseline_dir(self) -> Path:
        return Path(self.baseline or f"{self.out}-baseline")
