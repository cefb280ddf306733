"""Trains one student module alone on a teacher's recorded boundaries (no end-to-end backprop).

Module i of the student maps the teacher's boundary i to boundary i + 1:
    embedding   tokens -> b1                     MSE
    attention   b_i    -> b_{i+1}                MSE (the student may have fewer layers / narrower d_ff)
    decoding    b_{k-1} -> teacher logits        KL(teacher || student) + ce_weight * CE(next token)
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pathways import modules as mod
from pathways.distill.request import DistillConfig
from pathways.distill.store import ActivationStore
from pathways.modules import registry
from pathways.train import make_optimizer


def _loss(graphdef, is_head, ce_weight, state, x, y, targets):
    """(loss, (distillation term, a second metric)): MSE + relative MSE, or KL + CE."""
    m = nnx.merge(graphdef, state)
    if is_head:
        logits = mod.forward(m, x)  # (B, T, V)
        logp_s = jax.nn.log_softmax(logits)
        logp_t = jax.nn.log_softmax(y)
        kl = (jnp.exp(logp_t) * (logp_t - logp_s)).sum(-1).mean()
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return kl + ce_weight * ce, (kl, ce)
    pred = mod.forward(m, x)  # (B, T, D)
    mse = jnp.mean((pred - y) ** 2)
    return mse, (mse, mse / jnp.maximum(jnp.mean(y**2), 1e-12))


def _step(graphdef, is_head, ce_weight, tx, state, opt_state, x, y, targets):
    (loss, aux), g = jax.value_and_grad(
        functools.partial(_loss, graphdef, is_head, ce_weight), has_aux=True
    )(state, x, y, targets)
    updates, opt_state = tx.update(g, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss, aux


def _head_logits(graphdef, state, h):
    return nnx.merge(graphdef, state)(h)


_head_logits_jit = jax.jit(_head_logits, static_argnums=0)


def initial_module(cfg: mod.ModuleConfig, seed: int) -> nnx.Module:
    """A fresh student; students of kinds that can start as the identity (attention: zero
    residual outputs) do, which is exactly the map b_i -> b_i that the residual stream's update
    is learned on top of."""
    identity = registry.of(cfg).identity
    return mod.build(cfg if identity is None else identity(cfg), seed=seed)


def train_module(
    store: ActivationStore,
    position: int,
    cfg: mod.ModuleConfig,
    dcfg: DistillConfig,
    *,
    teacher_head: tuple | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> tuple[nnx.State, dict]:
    """Trains the student module at `position` of the pathway on the store's boundaries.

    Args:
        store: the teacher's recorded boundaries.
        position: 0 for the embedding, len(modules) - 1 for the decoding module.
        cfg: the student module's config (same kind and d_model as the teacher's module there).
        dcfg: steps, batch size, learning rate, CE weight, seed.
        teacher_head: (graphdef, state) of the teacher's decoding module; needed only when the
            store holds no logits (vocabulary above LOGITS_MAX_VOCAB).
        on_step: called with {"step", "loss", ...} after every step.

    Returns:
        (trained nnx.State, {"loss", "metric", "steps", "seconds", "params"}) where loss/metric are
        the means over the last 10% of steps (relative MSE for hidden maps, CE for the head).
    """
    names = store.index["boundaries"]
    if not 0 <= position < len(names) - 1:
        raise ValueError(f"position must be in [0, {len(names) - 2}], got {position}")
    # The boundaries fix the contract at each position: tokens in first, logits out last.
    wants = (
        "tokens" if position == 0 else "hidden",
        "logits" if position == len(names) - 2 else "hidden",
    )
    has = (cfg.input_contract[0], cfg.output_contract[0])
    if has != wants:
        raise ValueError(
            f"position {position} of the teacher maps {wants[0]} to {wants[1]}; the student "
            f"module there ({cfg.kind}) maps {has[0]} to {has[1]}"
        )
    if has[0] != "tokens" and cfg.input_contract[1] != store.index["d_model"]:
        raise ValueError(
            f"student d_model {cfg.input_contract[1]} != teacher boundary d_model "
            f"{store.index['d_model']}"
        )
    src, dst = names[position], names[position + 1]
    from_head = dst == "logits" and not store.has_logits
    if from_head and teacher_head is None:
        raise ValueError(
            f"store has no logits (vocab {store.index['vocab_size']} > "
            f"{store.index['logits_max_vocab']}): pass the teacher's decoding module"
        )
    wanted = [src, "targets"] + ([] if from_head else [dst])

    graphdef, state = nnx.split(initial_module(cfg, dcfg.seed + position))
    tx = make_optimizer(dcfg.train_config())
    opt_state = tx.init(state)
    step = jax.jit(
        functools.partial(_step, graphdef, registry.of(cfg).is_head, float(dcfg.ce_weight), tx),
        donate_argnums=(0, 1),
    )
    tail = max(1, dcfg.steps // 10)
    losses, metrics = [], []
    t0 = time.perf_counter()
    for i, b in enumerate(
        store.batches(wanted, dcfg.batch_size, dcfg.steps, seed=dcfg.seed + 1000 * position)
    ):
        x = jnp.asarray(b[src] if src == "tokens" else b[src].astype(np.float32))
        if from_head:
            y = _head_logits_jit(teacher_head[0], teacher_head[1], x)
        else:
            y = jnp.asarray(b[dst].astype(np.float32))
        state, opt_state, loss, aux = step(state, opt_state, x, y, jnp.asarray(b["targets"]))
        if i >= dcfg.steps - tail or on_step:
            rec = {"step": i + 1, "loss": float(loss), "metric": float(aux[1])}
            if i >= dcfg.steps - tail:
                losses.append(rec["loss"])
                metrics.append(rec["metric"])
            if on_step:
                on_step(rec)
    summary = {
        "loss": float(np.mean(losses)),
        "metric": float(np.mean(metrics)),
        "metric_name": "ce" if registry.of(cfg).is_head else "relative_mse",
        "steps": dcfg.steps,
        "seconds": time.perf_counter() - t0,
        "params": int(sum(x.size for x in jax.tree.leaves(state))),
    }
    return state, summary
