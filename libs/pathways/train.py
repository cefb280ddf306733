"""Local (single-process) training of a pathway: the monolithic baseline.

Each module has its own AdamW optimizer state (as it will when modules train in their own
services); gradient clipping is per module for the same reason.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pathways import checkpoint as ckpt
from pathways.data import TokenData
from pathways.executor.local import LocalExecutor, composite_loss


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
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}), got {self.warmup!r}")


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup, 1), cfg.steps, end_value=cfg.lr * cfg.min_lr_ratio)
    decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim >= 2)  # no decay on norms/biases
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def _step(chain, tx, states, opt_states, inputs, targets):
    loss, grads = jax.value_and_grad(functools.partial(composite_loss, chain))(
        states, inputs, targets)
    new_states, new_opts = [], []
    for st, g, o in zip(states, grads, opt_states):
        updates, o = tx.update(g, o, st)
        new_states.append(optax.apply_updates(st, updates))
        new_opts.append(o)
    return new_states, new_opts, loss


class LocalTrainer:
    """Trains one pathway of a LocalExecutor in place, checkpointing to `out`."""

    def __init__(self, executor: LocalExecutor, pathway: str, cfg: TrainConfig, data: TokenData,
                 out: str | Path, tokenizer):
        self.ex, self.pathway, self.cfg, self.data = executor, pathway, cfg, data
        self.out, self.tokenizer = Path(out), tokenizer
        limit = executor.spec.pathway(pathway).max_seq_len
        if cfg.seq_len > limit:
            raise ValueError(f"max sequence length exceeded: seq_len {cfg.seq_len} > pathway "
                             f"{pathway!r} max_seq_len {limit}")
        self.chain = executor.chain(pathway)
        self.tx = make_optimizer(cfg)
        self.opt_states = [self.tx.init(rt.state) for rt in self.chain]
        self.step = 0
        self._train_step = jax.jit(functools.partial(_step, self.chain, self.tx),
                                   donate_argnums=(0, 1))
        self._eval_loss = jax.jit(functools.partial(composite_loss, self.chain))

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        ckpt.save_spec(self.out, self.ex.spec, self.tokenizer)
        for rt, opt in zip(self.chain, self.opt_states):
            ckpt.save_module(self.out, rt.name, rt.state)
            leaves = {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(opt))}
            ckpt.save_tree(self.out / "train" / rt.name, leaves)
        ckpt.write_meta(self.out, {"step": self.step, "pathway": self.pathway,
                                   "config": dataclasses.asdict(self.cfg)})

    def try_resume(self) -> bool:
        """Loads parameters, optimizer states and step from `out` if it holds a training run."""
        meta = ckpt.read_meta(self.out)
        if meta is None:
            return False
        if meta.get("pathway") != self.pathway:
            raise ValueError(f"{self.out} holds a run of pathway {meta.get('pathway')!r}, "
                             f"not {self.pathway!r}")
        for i, rt in enumerate(self.chain):
            self.ex.set_state(rt.name, ckpt.load_module(self.out, rt.name, rt.state))
            leaves, treedef = jax.tree.flatten(self.opt_states[i])
            like = {str(j): np.asarray(x) for j, x in enumerate(leaves)}
            saved = ckpt.load_tree(self.out / "train" / rt.name, like)
            self.opt_states[i] = jax.tree.unflatten(
                treedef, [jnp.asarray(saved[str(j)]) for j in range(len(leaves))])
        self.step = int(meta["step"])
        return True

    # ---- loop ------------------------------------------------------------------------------------
    def eval_loss(self) -> float:
        states = [rt.state for rt in self.chain]
        losses = [float(self._eval_loss(states, *self.data.batch(
            i, self.cfg.batch_size, self.cfg.seq_len, self.cfg.seed, split="eval")))
            for i in range(self.cfg.eval_batches)]
        return float(np.mean(losses))

    def run(self, on_step: Callable[[dict], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> list[dict]:
        """Trains until cfg.steps; returns (and appends to metrics.jsonl) one record per step."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        history = []
        metrics = (self.out / "metrics.jsonl").open("a")
        try:
            while self.step < cfg.steps:
                if should_stop and should_stop():
                    break
                inputs, targets = self.data.batch(self.step, cfg.batch_size, cfg.seq_len, cfg.seed)
                t0 = time.perf_counter()
                states = [rt.state for rt in self.chain]
                new_states, self.opt_states, loss = self._train_step(
                    states, self.opt_states, inputs, targets)
                for rt, st in zip(self.chain, new_states):
                    rt.state = st
                loss = float(loss)
                dt = time.perf_counter() - t0
                self.step += 1
                rec = {"step": self.step, "loss": loss,
                       "tokens_per_s": cfg.batch_size * cfg.seq_len / dt}
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    rec["eval_loss"] = self.eval_loss()
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                history.append(rec)
                if on_step:
                    on_step(rec)
        finally:
            metrics.close()
        return history
