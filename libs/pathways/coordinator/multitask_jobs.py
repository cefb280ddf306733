"""Multi-task job requests (issue 19): several pathways of one spec trained in turn through the
modules they share, in this process's stages or through the module services.

    MultiTaskRequest(spec=..., out=..., steps=200, engine="services", modules={...}, tasks=[
        {"pathway": "text", "batch_size": 16, "seq_len": 128},
        {"pathway": "digits", "dataset": "digits", "batch_size": 32,
         "lr_scale": {"shared-0": 0.1, "shared-1": 0.1}}])

`steps` counts rounds: each round runs `weight` steps of every task in order; `lr_scale` scales a
task's updates of the modules it names (a mixing weight on modules it shares). `optimizers`:
"per-task" (default: each task its own AdamW state of every module it trains) or "shared" (one
per module; see `pathways.multitask`). The checkpoint in `out` holds each module once (shared by
every pathway using it) with its optimizer state(s).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from pathways.config import positive_int, unknown_fields
from pathways.coordinator.jobs import DATASETS
from pathways.pipeline.schedule import SCHEDULES

OPTIMIZERS = ("per-task", "shared")  # pathways.multitask's (not imported here: jax, optax)

ENGINES = ("pipeline", "services")  # one stage per module: shared by the tasks' pathways
TASK_FIELDS = ("pathway", "dataset", "batch_size", "seq_len", "weight", "lr_scale")


def _task(i: int, raw: Any) -> dict:
    where = f"tasks[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping with {', '.join(TASK_FIELDS)}")
    unknown = sorted(set(raw) - set(TASK_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    t = {"dataset": "", "batch_size": 16, "seq_len": 0, "weight": 1, "lr_scale": {}, **raw}
    if not isinstance(t.get("pathway"), str) or not t["pathway"]:
        raise ValueError(f"{where}: pathway is required")
    if t["dataset"] and t["dataset"] not in DATASETS:
        raise ValueError(
            f"{where}: dataset must be one of {', '.join(DATASETS)} (or empty: text); "
            f"got {t['dataset']!r}"
        )
    for name in ("batch_size", "weight"):
        positive_int(f"{where}.{name}", t[name])
    scales = t["lr_scale"]
    if not isinstance(scales, dict) or not all(
        isinstance(f, int | float) and not isinstance(f, bool) and f > 0 for f in scales.values()
    ):
        raise ValueError(f"{where}.lr_scale must map module names to factors > 0; got {scales!r}")
    if not isinstance(t["seq_len"], int) or t["seq_len"] < 0:
        raise ValueError(f"{where}.seq_len must be >= 0 (0: the pathway's); got {t['seq_len']!r}")
    return t


@dataclasses.dataclass(frozen=True)
class MultiTaskRequest:
    """A multi-task training job, as a client submits it (JSON-able; paths on the workers')."""

    task: ClassVar[str] = "pathways.multitask"

    spec: str
    out: str
    tasks: tuple[dict, ...]
    data: tuple[str, ...] = ()  # text tasks' files/folders; empty: the standard library sources
    max_data_mb: float = 4.0
    steps: int = 300  # rounds
    lr: float = 3e-3
    warmup: int | None = None  # rounds; None: steps / 15
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    seed: int = 0
    engine: str = "pipeline"
    schedule: str = "1f1b"
    micro_batches: int = 1
    modules: dict[str, str] = dataclasses.field(default_factory=dict)  # engine "services"
    optimizers: str = "per-task"  # or "shared": see pathways.multitask

    def __post_init__(self):
        object.__setattr__(self, "data", tuple(self.data))
        if not isinstance(self.tasks, list | tuple) or not self.tasks:
            raise ValueError("tasks must list at least one {pathway, ...}")
        object.__setattr__(self, "tasks", tuple(_task(i, t) for i, t in enumerate(self.tasks)))
        names = [t["pathway"] for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"each pathway may be one task only; got {', '.join(names)}")
        if self.optimizers not in OPTIMIZERS:
            raise ValueError(
                f"optimizers must be one of {', '.join(OPTIMIZERS)}; got {self.optimizers!r}"
            )
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}"
            )
        for name in ("steps", "eval_every", "eval_batches", "save_every", "micro_batches"):
            positive_int(name, getattr(self, name))
        if not str(self.out):
            raise ValueError("out (checkpoint directory) is required")
        if self.engine == "services" and not self.modules:
            raise ValueError("engine 'services' needs the module service addresses (modules)")
        self.train_config()  # validates lr and warmup

    def train_config(self):
        from pathways.train import TrainConfig

        return TrainConfig.with_warmup(
            self.steps,
            self.warmup,
            fit=True,
            lr=self.lr,
            eval_every=self.eval_every,
            eval_batches=self.eval_batches,
            save_every=self.save_every,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"], d["tasks"] = list(self.data), [dict(t) for t in self.tasks]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> MultiTaskRequest:
        unknown = unknown_fields(MultiTaskRequest, d)
        if unknown:
            raise ValueError(f"unknown job field(s) {', '.join(unknown)}")
        missing = [k for k in ("spec", "out", "tasks") if k not in d]
        if missing:
            raise ValueError(f"a multi-task job needs {', '.join(missing)}")
        return MultiTaskRequest(**d)

    @property
    def out_path(self) -> Path:
        return Path(self.out)


def build_multitask(req: MultiTaskRequest):
    """The job's `MultiTaskTrainer`: one stage per module of the tasks' pathways (configured
    once, with the updates it gets), each task's data set checked against its pathway."""
    from pathways import data as data_lib
    from pathways import spec as spec_lib
    from pathways import tokenizers
    from pathways.coordinator.runner import library_dataset
    from pathways.executor.local import LocalExecutor
    from pathways.multitask import (
        MultiTaskTrainer,
        Task,
        local_stages,
        module_configs,
        task_configs,
    )

    spec = spec_lib.load(req.spec)
    if spec.tokenizer.get("kind") != "byte":
        raise ValueError(
            f"multi-task jobs read text with the byte tokenizer; the spec's is "
            f"{spec.tokenizer.get('kind')!r}"
        )
    tok = tokenizers.ByteTokenizer()
    texts = None
    tasks = []
    for t in req.tasks:
        pathway = spec.pathway(t["pathway"])  # SpecError naming it when unknown
        if t["dataset"]:
            data = library_dataset(t["dataset"])
            data.check_pathway(spec, t["pathway"])
        else:
            if texts is None:
                texts = data_lib.read_texts(
                    list(req.data) or data_lib.default_corpus_paths(), int(req.max_data_mb * 1e6)
                )
            data = data_lib.TokenData.build(texts, tok)
        seq = t["seq_len"] or pathway.max_seq_len
        tasks.append(Task(t["pathway"], data, t["batch_size"], seq, t["weight"], t["lr_scale"]))
    cfg = req.train_config()
    if req.engine == "services":
        from pathways.pipeline.client import RemoteStage

        per_module = module_configs(spec, tasks, cfg)
        missing = [m for m in per_module if m not in req.modules]
        if missing:
            raise ValueError(f"no module service address for {', '.join(missing)}")
        stages = {m: RemoteStage(m, spec.modules[m].kind, req.modules[m]) for m in per_module}
        named = task_configs(spec, tasks, cfg) if req.optimizers == "per-task" else {}
        try:
            for m, st in stages.items():
                st.configure(per_module[m], optimizers=named.get(m))
        except Exception:
            for st in stages.values():
                st.close()
            raise
    else:
        stages = local_stages(LocalExecutor(spec, seed=req.seed), spec, tasks, cfg, req.optimizers)
    return MultiTaskTrainer(
        spec,
        tasks,
        stages,
        cfg,
        req.out_path,
        tok,
        n_micro=req.micro_batches,
        schedule=req.schedule,
        optimizers=req.optimizers,
    )
