"""Training a pathway: one loop, two engines.

`FusedEngine` jits the whole pathway's step as one program in this process (the monolithic
baseline). `PipelineEngine` runs the step through pipeline stages — in-process or module services —
over micro-batches. Both give each module its own AdamW state and per-module gradient clipping (as
modules living in separate services must), and both write the same checkpoint layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import optax

from pathways import checkpoint as ckpt
from pathways.config import positive_int, schedule
from pathways.data import TokenData
from pathways.executor.local import LocalExecutor
from pathways.pipeline.runner import run_step
from pathways.pipeline.schedule import SCHEDULES
from pathways.pipeline.stage import LocalStage, Stage
from pathways.runtime import composite_loss


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    seed: int = 0

    def __post_init__(self):
        schedule(self.steps, self.lr, self.warmup)
        for name in ("batch_size", "seq_len", "eval_every", "eval_batches", "save_every"):
            positive_int(name, getattr(self, name))

    @classmethod
    def with_warmup(
        cls, steps: int, warmup: int | None = None, *, fit: bool = False, **fields
    ) -> TrainConfig:
        """A job's settings where its warmup may be left out: None warms up for
        `default_warmup(steps)`. `fit` caps the warmup below `steps` rather than failing, for jobs
        whose step count is derived (rounds, a baseline's steps) and may be shorter than it."""
        warmup = default_warmup(steps) if warmup is None else warmup
        return cls(steps=steps, warmup=min(warmup, steps - 1) if fit else warmup, **fields)


def default_warmup(steps: int) -> int:
    """The warmup of a job that names none: a fifteenth of its steps, at least one."""
    return max(1, steps // 15)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup, 1), cfg.steps, end_value=cfg.lr * cfg.min_lr_ratio
    )
    decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim >= 2)  # no decay on norms/biases
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def _fused_step(loss_fn, tx, trainable, scales, states, opt_states, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(states, inputs, targets)
    new_states, new_opts = [], []
    for st, g, o, learns, scale in zip(states, grads, opt_states, trainable, scales):
        if not learns:  # frozen: its gradient is dead code, which XLA drops
            new_states.append(st)
            new_opts.append(o)
            continue
        updates, o = tx.update(g, o, st)
        if scale != 1.0:  # AdamW's update is lr x (...): scaling it scales this module's lr
            updates = jax.tree.map(lambda u, s=scale: u * s, updates)
        new_states.append(optax.apply_updates(st, updates))
        new_opts.append(o)
    return new_states, new_opts, loss


def _check_trainable(names: list[str], trainable) -> set[str]:
    """The set of module names that learn (all when `trainable` is None), validated."""
    if trainable is None:
        return set(names)
    trainable = set(trainable)
    unknown = sorted(trainable - set(names))
    if unknown:
        raise ValueError(
            f"trainable module(s) {', '.join(unknown)} not in the pathway " f"({', '.join(names)})"
        )
    if not trainable:
        raise ValueError("trainable is empty: nothing would learn")
    return trainable


def _lr_scales(names: list[str], lr_scale: dict[str, float] | None) -> tuple[float, ...]:
    """Per module of `names`, its learning-rate factor (1 unless `lr_scale` names it)."""
    lr_scale = lr_scale or {}
    unknown = sorted(set(lr_scale) - set(names))
    if unknown:
        raise ValueError(f"lr_scale names module(s) {', '.join(unknown)} not in the pathway")
    for name, f in lr_scale.items():
        if not (isinstance(f, int | float) and f > 0):
            raise ValueError(f"lr_scale of {name!r} must be > 0 (freeze it instead), got {f!r}")
    return tuple(float(lr_scale.get(n, 1.0)) for n in names)


class FusedEngine:
    """The whole pathway's training step as one jitted program (single process).

    `trainable` names the modules that learn (default: all); the others stay frozen.
    `lr_scale` multiplies the learning rate of the modules it names (e.g. attention modules a
    task shares with another that should own them: issue 19's task mixing weights).
    """

    def __init__(
        self,
        executor: LocalExecutor,
        pathway: str,
        tx: optax.GradientTransformation,
        trainable: set[str] | None = None,
        lr_scale: dict[str, float] | None = None,
    ):
        self.chain = executor.chain(pathway)
        self.names = [rt.name for rt in self.chain]
        loss = functools.partial(
            composite_loss, self.chain, causal=executor.spec.pathway(pathway).causal
        )
        learns = _check_trainable(self.names, trainable)
        # Stages only as the per-module holders of optimizer state and checkpoint I/O.
        self.stages = [LocalStage(rt, tx, frozen=rt.name not in learns) for rt in self.chain]
        mask = tuple(n in learns for n in self.names)
        scales = _lr_scales(self.names, lr_scale)
        self._step = jax.jit(
            functools.partial(_fused_step, loss, tx, mask, scales), donate_argnums=(0, 1)
        )
        self._loss = jax.jit(loss)

    def step(self, inputs, targets) -> dict:
        states = [rt.state for rt in self.chain]
        opts = [st.opt_state for st in self.stages]
        t0 = time.perf_counter()
        new_states, new_opts, loss = self._step(states, opts, inputs, targets)
        loss = float(loss)
        for rt, st, s, o in zip(self.chain, self.stages, new_states, new_opts):
            rt.state, st.opt_state = s, o
        return {"loss": loss, "stage_seconds": {"fused": time.perf_counter() - t0}}

    def eval_loss(self, inputs, targets) -> float:
        return float(self._loss([rt.state for rt in self.chain], inputs, targets))

    def save(self, out: Path) -> None:
        for st in self.stages:
            st.save(out)

    def load(self, out: Path) -> None:
        for st in self.stages:
            st.load(out)


TRANSFERS = ("direct", "relay")


class PipelineEngine:
    """A training step through a chain of stages (local or remote), pipelined over micro-batches.

    `trainable` names the stages that learn (default: all); the others are frozen, and frozen
    stages before the first learning one skip their backward entirely.
    """

    def __init__(
        self,
        stages: list[Stage],
        n_micro: int = 4,
        schedule: str = "1f1b",
        trainable: set[str] | None = None,
        transfer: str = "direct",
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
        if transfer not in TRANSFERS:
            raise ValueError(f"transfer must be one of {', '.join(TRANSFERS)}; got {transfer!r}")
        self.stages, self.n_micro, self.schedule = stages, n_micro, schedule
        # "direct": stages that can send activations to each other (module services) do, and
        # this process only hands out inputs and targets; "relay": every activation and
        # gradient passes through this process (in-process stages always work this way).
        direct = getattr(type(stages[0]), "direct_step", None) if stages else None
        same = len({type(s) for s in stages}) == 1
        self._direct = direct if transfer == "direct" and same else None
        self.names = [s.name for s in stages]
        if trainable is not None:
            learns = _check_trainable(self.names, trainable)
            first = min(i for i, n in enumerate(self.names) if n in learns)
            for i, st in enumerate(stages):
                if not hasattr(st, "freeze"):
                    raise TypeError(f"stage {st.name!r} ({type(st).__name__}) cannot be frozen")
                st.freeze(st.name not in learns, input_grad=i > first)

    def step(self, inputs, targets) -> dict:
        before = self._wire_bytes()
        if self._direct is None:
            out = run_step(self.stages, inputs, targets, self.n_micro, self.schedule)
        else:
            t0 = time.perf_counter()
            out = self._direct(self.stages, inputs, targets, self.n_micro, self.schedule)
            with ThreadPoolExecutor(max_workers=len(self.stages)) as pool:
                norms = list(pool.map(lambda s: s.apply()["grad_norm"], self.stages))
            out["grad_norms"] = dict(zip(self.names, norms))
            out["wall_seconds"] = time.perf_counter() - t0  # as run_step: apply included
        if before is not None:
            out["wire_bytes"] = self._wire_bytes() - before
        return out

    def _wire_bytes(self) -> int | None:
        """Bytes remote stages moved over the wire so far (None for in-process stages)."""
        counts = [getattr(st, "wire_bytes", None) for st in self.stages]
        return None if any(c is None for c in counts) else sum(counts)

    def eval_loss(self, inputs, targets) -> float:
        x = inputs
        for st in self.stages[:-1]:
            x = st.evaluate(x)
        return float(self.stages[-1].evaluate(x, targets))

    def _each(self, fn) -> None:
        with ThreadPoolExecutor(max_workers=len(self.stages)) as pool:
            list(pool.map(fn, self.stages))

    def save(self, out: Path) -> None:
        self._each(lambda s: s.save(out))

    def close(self) -> None:
        """Releases remote stages' channels (in-process stages hold none)."""
        for st in self.stages:
            if hasattr(st, "close"):
                st.close()

    def load(self, out: Path) -> None:
        self._each(lambda s: s.load(out))


class Trainer:
    """The training loop: deterministic batches, eval, checkpoints, metrics, exact resume."""

    def __init__(
        self,
        engine,
        spec,
        pathway: str,
        tokenizer,
        cfg: TrainConfig,
        data: TokenData,
        out: str | Path,
    ):
        self.engine, self.spec, self.pathway = engine, spec, pathway
        self.tokenizer, self.cfg, self.data, self.out = tokenizer, cfg, data, Path(out)
        limit = spec.pathway(pathway).max_seq_len
        if cfg.seq_len > limit:
            raise ValueError(
                f"max sequence length exceeded: seq_len {cfg.seq_len} > pathway "
                f"{pathway!r} max_seq_len {limit}"
            )
        self.step = 0

    def save(self) -> None:
        ckpt.save_spec(self.out, self.spec, self.tokenizer)
        self.engine.save(self.out)
        ckpt.write_meta(
            self.out,
            {"step": self.step, "pathway": self.pathway, "config": dataclasses.asdict(self.cfg)},
        )

    def try_resume(self) -> bool:
        """Loads parameters, optimizer states and step from `out` if it holds a training run."""
        meta = ckpt.read_meta(self.out)
        if meta is None:
            return False
        if meta.get("pathway") != self.pathway:
            raise ValueError(
                f"{self.out} holds a run of pathway {meta.get('pathway')!r}, "
                f"not {self.pathway!r}"
            )
        self.engine.load(self.out)
        self.step = int(meta["step"])
        self._truncate_metrics()
        return True

    def _truncate_metrics(self) -> None:
        """Drops records of steps after the checkpoint: they are about to be run again."""
        ckpt.truncate_records(self.out / "metrics.jsonl", "step", self.step)

    def eval_loss(self) -> float:
        c = self.cfg
        return float(
            np.mean(
                [
                    self.engine.eval_loss(
                        *self.data.batch(i, c.batch_size, c.seq_len, c.seed, split="eval")
                    )
                    for i in range(c.eval_batches)
                ]
            )
        )

    def run(
        self,
        on_step: Callable[[dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[dict]:
        """Trains until cfg.steps; returns (and appends to metrics.jsonl) one record per step."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        history = []
        with (self.out / "metrics.jsonl").open("a") as metrics:
            while self.step < cfg.steps:
                if should_stop and should_stop():
                    break
                inputs, targets = self.data.batch(self.step, cfg.batch_size, cfg.seq_len, cfg.seed)
                t0 = time.perf_counter()
                out = self.engine.step(inputs, targets)
                dt = time.perf_counter() - t0
                self.step += 1
                rec = {
                    "step": self.step,
                    "loss": out["loss"],
                    "tokens_per_s": cfg.batch_size * cfg.seq_len / dt,
                    "step_seconds": dt,
                    "stage_seconds": out.get("stage_seconds", {}),
                }
                if "wire_bytes" in out:
                    rec["wire_bytes"] = out["wire_bytes"]
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    rec["eval_loss"] = self.eval_loss()
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                history.append(rec)
                if on_step:
                    on_step(rec)
        return history


class LocalTrainer(Trainer):
    """A Trainer over this process's executor: fused (the baseline) or pipelined over stages."""

    def __init__(
        self,
        executor: LocalExecutor,
        pathway: str,
        cfg: TrainConfig,
        data: TokenData,
        out: str | Path,
        tokenizer,
        *,
        engine: str = "fused",
        n_micro: int = 4,
        schedule: str = "1f1b",
        trainable: set[str] | None = None,
        lr_scale: dict[str, float] | None = None,
    ):
        tx = make_optimizer(cfg)
        if engine == "fused":
            eng = FusedEngine(executor, pathway, tx, trainable, lr_scale)
        elif lr_scale:
            raise ValueError("lr_scale is supported by the fused engine only")
        elif engine == "pipeline":
            causal = executor.spec.pathway(pathway).causal
            stages = [LocalStage(rt, tx, causal=causal) for rt in executor.chain(pathway)]
            eng = PipelineEngine(stages, n_micro, schedule, trainable)
        else:
            raise ValueError(f"engine must be 'fused' or 'pipeline', got {engine!r}")
        super().__init__(eng, executor.spec, pathway, tokenizer, cfg, data, out)
