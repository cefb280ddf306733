"""Training several pathways of one spec in turn through the modules they share (issue 19).

One stage per module (in-process `LocalStage`s over one executor, or `RemoteStage`s of the
module services), so a module shared by several pathways has one set of parameters, one
optimizer state and one checkpoint, whichever pathway trains it. Each round runs `weight` steps
of each task in order (the task mixing schedule); before a task's steps every stage of its
pathway takes that pathway's attention mask (causal text, bidirectional images and audio), which
through the services travels with each call. A module's learning-rate schedule counts the
updates it will get: the sum over the tasks that use it.

Optimizer states ("per-task", the default): a module's updates from each task step that task's
own AdamW state and schedule (the stage's named optimizers), as training each task by itself
would, so one task's gradients never move another's steps through a shared momentum; "shared":
one AdamW state per module for every task, its schedule counting all their updates. With task
mixing weights (`lr_scale`) only per-task states keep each task's share to its factor: a shared
momentum carries the other tasks' gradients into the text task's full-rate steps
(BENCHMARKS.md "Sharing": text +11 % against +1.1 % at the same factors).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pathways import checkpoint as ckpt
from pathways.spec import PathwaySpec
from pathways.train import PipelineEngine, TrainConfig


@dataclasses.dataclass(frozen=True)
class Task:
    """One pathway and its data: `data.batch(step, batch_size, seq_len, seed, split)` gives
    (inputs, targets) its head's loss reads; `weight` steps of it per round; `lr_scale`: factors
    of its updates of some modules (a mixing weight on modules it shares: BENCHMARKS.md
    "Sharing")."""

    pathway: str
    data: object
    batch_size: int
    seq_len: int
    weight: int = 1
    lr_scale: dict = dataclasses.field(default_factory=dict)


def module_configs(spec: PathwaySpec, tasks: list[Task], base: TrainConfig) -> dict:
    """Per module of the tasks' pathways, `base` with the steps (and warm-up, in proportion)
    of the updates it gets: rounds x the weights of the tasks through it."""
    out = {}
    for m in dict.fromkeys(m for t in tasks for m in spec.pathway(t.pathway).modules):
        per_round = sum(t.weight for t in tasks if m in spec.pathway(t.pathway).modules)
        steps = base.steps * per_round
        out[m] = dataclasses.replace(
            base, steps=steps, warmup=min(base.warmup * per_round, steps - 1)
        )
    return out


OPTIMIZERS = ("per-task", "shared")


def task_configs(spec: PathwaySpec, tasks: list[Task], base: TrainConfig) -> dict:
    """Per module, per task through it: `base` with the task's updates of it (rounds x its
    weight) and warm-up in proportion: the named optimizers of "per-task" states."""
    out = {}
    for t in tasks:
        steps = base.steps * t.weight
        cfg = dataclasses.replace(base, steps=steps, warmup=min(base.warmup * t.weight, steps - 1))
        for m in spec.pathway(t.pathway).modules:
            out.setdefault(m, {})[t.pathway] = cfg
    return out


def local_stages(
    executor,
    spec: PathwaySpec,
    tasks: list[Task],
    base: TrainConfig,
    optimizers: str = "per-task",
) -> dict:
    """One in-process stage per module of the tasks' pathways over `executor`'s runtimes (the
    job's engine "pipeline"), with its optimizer(s) (see the module docstring)."""
    from pathways.pipeline.stage import LocalStage
    from pathways.train import make_optimizer

    _check_optimizers(optimizers)
    if optimizers == "per-task":
        txs = {
            m: {p: make_optimizer(c) for p, c in per_task.items()}
            for m, per_task in task_configs(spec, tasks, base).items()
        }
    else:
        txs = {m: make_optimizer(c) for m, c in module_configs(spec, tasks, base).items()}
    return {m: LocalStage(executor.runtimes[m], tx) for m, tx in txs.items()}


def _check_optimizers(optimizers: str) -> None:
    if optimizers not in OPTIMIZERS:
        raise ValueError(f"optimizers must be one of {', '.join(OPTIMIZERS)}; got {optimizers!r}")


class MultiTaskTrainer:
    """Rounds of every task's steps over shared stages; checkpoints, metrics and exact resume
    as `train.Trainer` (a round is a step of metrics.jsonl)."""

    def __init__(
        self,
        spec: PathwaySpec,
        tasks: list[Task],
        stages: dict,
        cfg: TrainConfig,
        out: str | Path,
        tokenizer,
        *,
        n_micro: int = 1,
        schedule: str = "1f1b",
        optimizers: str = "per-task",
    ):
        """`stages` must have been made for `optimizers` (`local_stages`, or remote stages
        configured with `task_configs`' named optimizers for "per-task")."""
        _check_optimizers(optimizers)
        if not tasks:
            raise ValueError("a multi-task run needs at least one task")
        names = [t.pathway for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"each pathway may be one task only; got {', '.join(names)}")
        for t in tasks:
            if not (isinstance(t.weight, int) and t.weight >= 1):
                raise ValueError(f"task {t.pathway!r}: weight must be an integer >= 1")
            limit = spec.pathway(t.pathway).max_seq_len
            if t.seq_len > limit:
                raise ValueError(
                    f"task {t.pathway!r}: seq_len {t.seq_len} > the pathway's max_seq_len {limit}"
                )
            unknown = sorted(set(t.lr_scale) - set(spec.pathway(t.pathway).modules))
            if unknown:
                raise ValueError(
                    f"task {t.pathway!r}: lr_scale names module(s) {', '.join(unknown)} not in "
                    f"the pathway"
                )
            if t.batch_size % n_micro:
                raise ValueError(
                    f"task {t.pathway!r}: batch_size {t.batch_size} is not divisible into "
                    f"micro_batches {n_micro}"
                )
        self.spec, self.tasks, self.stages, self.cfg = spec, tasks, stages, cfg
        self.out, self.tokenizer = Path(out), tokenizer
        self.optimizers = optimizers
        self.engines = {
            t.pathway: PipelineEngine(
                [stages[m] for m in spec.pathway(t.pathway).modules], n_micro, schedule
            )
            for t in tasks
        }
        self.step = 0  # rounds done

    def _engine(self, task: Task) -> PipelineEngine:
        causal = self.spec.pathway(task.pathway).causal
        for st in self.engines[task.pathway].stages:
            st.set_causal(causal)
            st.lr_scale = task.lr_scale.get(st.name, 1.0)
            if self.optimizers == "per-task":
                st.use(task.pathway)
        return self.engines[task.pathway]

    def eval_losses(self) -> dict[str, float]:
        c = self.cfg
        out = {}
        for t in self.tasks:
            eng = self._engine(t)
            out[t.pathway] = float(
                np.mean(
                    [
                        eng.eval_loss(*t.data.batch(i, t.batch_size, t.seq_len, c.seed, "eval"))
                        for i in range(c.eval_batches)
                    ]
                )
            )
        return out

    def save(self) -> None:
        ckpt.save_spec(self.out, self.spec, self.tokenizer)
        for st in self.stages.values():  # each module once, whichever pathways use it
            st.save(self.out)
        ckpt.write_meta(
            self.out,
            {
                "step": self.step,
                "tasks": [
                    {"pathway": t.pathway, "batch_size": t.batch_size, "weight": t.weight}
                    for t in self.tasks
                ],
                "config": dataclasses.asdict(self.cfg),
            },
        )

    def try_resume(self) -> bool:
        """Loads every module, its optimizer state and the round from `out` if it holds a run
        of these tasks."""
        meta = ckpt.read_meta(self.out)
        if meta is None:
            return False
        have = [t.get("pathway") for t in meta.get("tasks", [])]
        if have != [t.pathway for t in self.tasks]:
            raise ValueError(
                f"{self.out} holds a run of {have or meta.get('pathway')!r}, not of the tasks "
                f"{[t.pathway for t in self.tasks]}"
            )
        for st in self.stages.values():
            st.load(self.out)
        self.step = int(meta["step"])
        ckpt.truncate_records(self.out / "metrics.jsonl", "step", self.step)
        return True

    def run(
        self,
        on_step: Callable[[dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[dict]:
        """Runs rounds until cfg.steps; returns (and appends to metrics.jsonl) one record per
        round: the mean loss over the tasks and each task's own."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        history = []
        with (self.out / "metrics.jsonl").open("a") as metrics:
            while self.step < cfg.steps:
                if should_stop and should_stop():
                    break
                t0 = time.perf_counter()
                losses = {}
                for t in self.tasks:
                    eng = self._engine(t)
                    for j in range(t.weight):
                        i = self.step * t.weight + j  # the task's own step: its batch
                        out = eng.step(*t.data.batch(i, t.batch_size, t.seq_len, cfg.seed))
                        losses.setdefault(t.pathway, []).append(out["loss"])
                self.step += 1
                task_losses = {p: float(np.mean(v)) for p, v in losses.items()}
                rec = {
                    "step": self.step,
                    "loss": float(np.mean(list(task_losses.values()))),
                    "task_losses": task_losses,
                    "step_seconds": time.perf_counter() - t0,
                }
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    rec["task_eval_losses"] = self.eval_losses()
                    rec["eval_loss"] = float(np.mean(list(rec["task_eval_losses"].values())))
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                history.append(rec)
                if on_step:
                    on_step(rec)
        return history

    def close(self) -> None:
        for st in self.stages.values():
            if hasattr(st, "close"):
                st.close()
