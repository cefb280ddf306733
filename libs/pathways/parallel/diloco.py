"""DiLoCo (Douillard et al. 2023, arXiv 2311.08105): workers train apart, modules sync every H.

A round: K workers start from the same global parameters; each takes H inner steps (its own inner
optimizer, AdamW by default) on its own data shard, then sends each module's pseudo-gradient,
global - local. The outer step then runs per module: SGD with Nesterov momentum (lr 0.7, momentum
0.9 by default) on the mean of the pseudo-gradients of the workers that reported that module.

Modules stay separate units: a pseudo-gradient, an outer optimizer state and an update per module
name (as `LocalExecutor.loss_and_grads` returns gradients), so a module can be synchronised among
any subset of workers (DiPaCo's paths) without touching the others.

Who holds the outer state: the coordinator, one optax state per module, saved with each round's
checkpoint (global parameters, outer states, round number, data positions; see
`parallel/diloco_job.py`). Why there: the outer step needs every reporting worker's
pseudo-gradient of a module at once, and it is cheap (a few element-wise ops per parameter, once
per H steps), so it costs nothing to run it where the uploads arrive; one writer makes the round's
checkpoint a single commit (parameters and momentum from the same round), which is what makes a
resumed job exact; and module services are replicated and stateless between requests for serving,
so N replicas would otherwise have to agree on one momentum. The price is that the coordinator's
link carries the K uploads of every round; bytes are counted (`nbytes`) so that cost is visible.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pathways import codec
from pathways.config import one_of, positive_int, positive_number, require
from pathways.executor.local import LocalExecutor
from pathways.train import TrainConfig, make_optimizer

INNER = ("adamw", "sgd")
COMPRESS = ("none", "bfloat16", "int8")
INT8_BLOCK = 64  # int8 pseudo-gradients: one float32 scale per 64 values of the last axis


@dataclasses.dataclass(frozen=True)
class DiLoCoConfig:
    workers: int = 4
    inner_steps: int = 50  # H
    inner: str = "adamw"  # adamw: the project's optimizer (TrainConfig); sgd: constant lr
    outer_lr: float = 0.7
    outer_momentum: float = 0.9  # 0: plain SGD on the mean pseudo-gradient
    nesterov: bool = True
    compress: str = "none"  # pseudo-gradients on the wire: float32, bfloat16 or block int8

    def __post_init__(self):
        positive_int("workers", self.workers)
        positive_int("inner_steps", self.inner_steps)
        one_of("inner", self.inner, INNER)
        one_of("compress", self.compress, COMPRESS)
        positive_number("outer_lr", self.outer_lr)
        m = self.outer_momentum
        require(
            isinstance(m, int | float) and not isinstance(m, bool) and 0 <= m < 1,
            f"outer_momentum must be in [0, 1), got {m!r}",
        )


def inner_optimizer(kind: str, cfg: TrainConfig) -> optax.GradientTransformation:
    """adamw: `train.make_optimizer` (warmup + cosine over cfg.steps, clipping); sgd: constant lr,
    clipped by global norm only when cfg.clip > 0."""
    if kind == "adamw":
        if cfg.clip <= 0:
            raise ValueError(f"the adamw inner optimizer clips: clip must be > 0, got {cfg.clip!r}")
        return make_optimizer(cfg)
    if kind == "sgd":
        sgd = optax.sgd(cfg.lr)
        return optax.chain(optax.clip_by_global_norm(cfg.clip), sgd) if cfg.clip > 0 else sgd
    raise ValueError(f"inner must be one of {', '.join(INNER)}; got {kind!r}")


def outer_optimizer(cfg: DiLoCoConfig) -> optax.GradientTransformation:
    momentum = cfg.outer_momentum or None
    return optax.sgd(cfg.outer_lr, momentum=momentum, nesterov=bool(momentum) and cfg.nesterov)


# ---- data -------------------------------------------------------------------------------------
def shard(tokens: np.ndarray, workers: int, worker: int) -> np.ndarray:
    """Worker `worker`'s contiguous 1/workers of the training tokens (all shards equal length)."""
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} out of range for {workers} workers")
    n = len(tokens) // workers
    return tokens[worker * n : (worker + 1) * n]


def shard_batch(tokens, worker: int, position: int, batch_size: int, seq_len: int, seed: int):
    """The `position`-th batch of a worker's shard: (inputs, targets), each (B, T) int32; a pure
    function of (seed, worker, position), so a round can be run again and give the same batches."""
    if len(tokens) < seq_len + 2:
        raise ValueError(
            f"worker {worker}'s shard has {len(tokens)} tokens, fewer than seq_len {seq_len} + 2: "
            f"give more data, fewer workers or a shorter seq_len"
        )
    rng = np.random.default_rng([seed, worker, position])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts])  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


# ---- the inner loop ---------------------------------------------------------------------------
def _apply(tx, grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


class InnerWorker:
    """One worker's inner loop over a LocalExecutor: steps of the inner optimizer, per module."""

    def __init__(self, executor: LocalExecutor, pathway: str, tx: optax.GradientTransformation):
        self.ex, self.pathway, self.tx = executor, pathway, tx
        self.names = [rt.name for rt in executor.chain(pathway)]
        self._apply = jax.jit(functools.partial(_apply, tx))

    def init_opt(self) -> dict[str, Any]:
        return {n: self.tx.init(self.ex.state(n)) for n in self.names}

    def train(self, params: dict[str, Any], opt: dict[str, Any], batches: Iterable):
        """H inner steps from `params` (module -> state); returns (local params, opt, losses)."""
        for n in self.names:
            self.ex.set_state(n, params[n])
        opt, losses = dict(opt), []
        for inputs, targets in batches:
            loss, grads = self.ex.loss_and_grads(self.pathway, inputs, targets)
            for n in self.names:
                state, opt[n] = self._apply(grads[n], opt[n], self.ex.state(n))
                self.ex.set_state(n, state)
            losses.append(float(loss))
        return {n: self.ex.state(n) for n in self.names}, opt, losses


# ---- pseudo-gradients on the wire -------------------------------------------------------------
def pseudo_gradient(global_state, local_state):
    """global - local: how far the worker moved the module, as a gradient (descent follows it)."""
    return jax.tree.map(lambda g, x: g - x, global_state, local_state)


def encode(tree, compress: str) -> list[np.ndarray]:
    """A module's tree as the arrays sent: float32, bfloat16 bits (uint16, round to nearest), or
    int8 (symmetric, per block of `INT8_BLOCK` values: each leaf as int8 values and float32
    scales: about 0.27 of float32's bytes for rows of 64 or more)."""
    leaves = [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]
    if compress == "none":
        return leaves
    if compress == "bfloat16":
        return [x.astype(jnp.bfloat16).view(np.uint16) for x in leaves]
    if compress == "int8":
        return [a for x in leaves for a in codec.quantize_int8(x, INT8_BLOCK)]
    raise ValueError(f"compress must be one of {', '.join(COMPRESS)}; got {compress!r}")


def decode(arrays: list[np.ndarray], compress: str, like):
    """The inverse of `encode` into the structure of `like` (float32 leaves)."""
    treedef = jax.tree.structure(like)
    shapes = [np.shape(x) for x in jax.tree.leaves(like)]
    per_leaf = 2 if compress == "int8" else 1
    if len(arrays) != per_leaf * len(shapes):
        raise ValueError(
            f"payload has {len(arrays)} arrays, the module has {len(shapes)} "
            f"({per_leaf} array(s) each with compress {compress!r})"
        )
    if compress == "bfloat16":
        arrays = [a.view(jnp.bfloat16).astype(np.float32) for a in arrays]
    elif compress == "int8":
        arrays = [
            _dequantize_int8(q, scales, s)
            for q, scales, s in zip(arrays[::2], arrays[1::2], shapes)
        ]
    elif compress != "none":
        raise ValueError(f"compress must be one of {', '.join(COMPRESS)}; got {compress!r}")
    for i, (a, s) in enumerate(zip(arrays, shapes)):
        if a.shape != s:
            raise ValueError(f"payload array {i} has shape {a.shape}, the module's is {s}")
    return jax.tree.unflatten(treedef, [np.asarray(a, np.float32) for a in arrays])


def _dequantize_int8(q: np.ndarray, scales: np.ndarray, shape: tuple) -> np.ndarray:
    q = np.asarray(q)
    if q.dtype != np.int8 or q.size != int(np.prod(shape)):
        raise ValueError(f"int8 payload {q.dtype} {list(q.shape)} does not fit a leaf {shape}")
    flat = q.reshape(shape if shape else (1,)).astype(np.float32)
    nb = -(-flat.shape[-1] // INT8_BLOCK)
    if scales.shape != flat.shape[:-1] + (nb,):
        raise ValueError(f"int8 scales {list(scales.shape)} do not fit a leaf {shape}")
    per = np.repeat(scales.astype(np.float32), INT8_BLOCK, axis=-1)[..., : flat.shape[-1]]
    return (flat * per).reshape(shape)


def nbytes(arrays) -> int:
    return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(arrays)))


# ---- the outer step ---------------------------------------------------------------------------
class OuterOptimizer:
    """The outer step of one module at a time: its own optax state, the mean of the reported
    pseudo-gradients as its gradient."""

    def __init__(self, cfg: DiLoCoConfig):
        self.tx = outer_optimizer(cfg)

    def init(self, params):
        return self.tx.init(params)

    def step(self, params, opt_state, pseudo_grads: list):
        """Returns (new params, new outer state) of a module; pseudo_grads: one per reporter."""
        if not pseudo_grads:
            raise ValueError("an outer step needs at least one pseudo-gradient")
        n = len(pseudo_grads)
        mean = jax.tree.map(lambda *g: functools.reduce(jnp.add, g) / n, *pseudo_grads)
        updates, opt_state = self.tx.update(mean, opt_state, params)
        return optax.apply_updates(params, updates), opt_state


def simulate(
    executor: LocalExecutor,
    pathway: str,
    train: TrainConfig,
    cfg: DiLoCoConfig,
    tokens: np.ndarray,
    rounds: int,
) -> list[dict]:
    """Runs `rounds` rounds in this process, workers one after another (the same arithmetic as
    the coordinator's job, for tests and quick comparisons); returns one record per round."""
    tx = inner_optimizer(cfg.inner, train)
    worker = InnerWorker(executor, pathway, tx)
    outer = OuterOptimizer(cfg)
    params = {n: executor.state(n) for n in worker.names}
    outer_state = {n: outer.init(p) for n, p in params.items()}
    inner_state = [worker.init_opt() for _ in range(cfg.workers)]
    shards = [shard(tokens, cfg.workers, k) for k in range(cfg.workers)]
    history = []
    for r in range(rounds):
        grads, losses = {n: [] for n in params}, []
        for k in range(cfg.workers):
            first = r * cfg.inner_steps
            batches = (
                shard_batch(shards[k], k, first + h, train.batch_size, train.seq_len, train.seed)
                for h in range(cfg.inner_steps)
            )
            local, inner_state[k], ls = worker.train(params, inner_state[k], batches)
            losses.append(ls)
            for n in params:
                pg = pseudo_gradient(params[n], local[n])
                grads[n].append(decode(encode(pg, cfg.compress), cfg.compress, pg))
        for n in params:
            params[n], outer_state[n] = outer.step(params[n], outer_state[n], grads[n])
        history.append({"round": r + 1, "losses": losses})
    for n, p in params.items():
        executor.set_state(n, p)
    return history
