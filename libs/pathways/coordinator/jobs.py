"""Training job requests: what a client submits, validated before anything runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pathways.config import positive_int, unknown_fields
from pathways.pipeline.schedule import SCHEDULES

ENGINES = ("fused", "pipeline", "services")
# Library data sets a job can train on instead of text (`pathways.datasets`): labelled images,
# spoken words, expert demonstrations of the robotics tasks (behaviour cloning).
DATASETS = ("digits", "speech", "doorkey", "fourrooms", "reacher")


@dataclasses.dataclass(frozen=True)
class JobRequest:
    spec: str  # path of the pathway spec (YAML) on the workers' filesystem
    out: str  # checkpoint directory: resumed if it already holds this job's run
    pathway: str | None = None
    data: tuple[str, ...] = ()  # text files/folders; empty means the standard library sources
    dataset: str = ""  # instead of text: a library data set (DATASETS) the pathway reads
    max_data_mb: float = 4.0
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int | None = None
    eval_every: int = 50
    save_every: int = 50
    seed: int = 0
    # fused: one process, one program; pipeline: in-process stages; services: module services.
    engine: str = "pipeline"
    schedule: str = "1f1b"
    micro_batches: int = 4
    # For engine "services": module name -> "host:port" of the module service that trains it.
    modules: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        if self.dataset and self.dataset not in DATASETS:
            raise ValueError(
                f"dataset must be one of {', '.join(DATASETS)} (or empty: text); "
                f"got {self.dataset!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {', '.join(SCHEDULES)}; " f"got {self.schedule!r}"
            )
        for name in ("steps", "batch_size", "seq_len", "micro_batches", "eval_every", "save_every"):
            positive_int(name, getattr(self, name))
        if self.batch_size % self.micro_batches:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible into "
                f"micro_batches {self.micro_batches}"
            )
        if not str(self.out):
            raise ValueError("out (checkpoint directory) is required")
        if self.engine == "services" and not self.modules:
            raise ValueError("engine 'services' needs the module service addresses (modules)")
        object.__setattr__(self, "data", tuple(self.data))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"] = list(self.data)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> JobRequest:
        unknown = unknown_fields(JobRequest, d)
        if unknown:
            raise ValueError(f"unknown job field(s) {', '.join(unknown)}")
        if "spec" not in d or "out" not in d:
            raise ValueError("a job needs 'spec' and 'out'")
        return JobRequest(**d)

    @property
    def out_path(self) -> Path:
        return Path(self.out)
