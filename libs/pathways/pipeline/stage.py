"""One module as a pipeline stage: forward/backward over micro-batches, its own optimizer.

A stage owns its parameters, its optimizer state, its gradient accumulator and the residuals of
the micro-batches in flight. Only activations and activation-gradients enter or leave it.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pathways.executor.local import ModuleRuntime


class Stage(Protocol):
    name: str
    kind: str

    def forward(self, mb: int, x, targets=None):
        """Hidden states out (or, for the last stage, the micro-batch's mean loss)."""

    def backward(self, mb: int, grad):
        """Gradient w.r.t. the stage's input (None for the embedding); accumulates param grads."""

    def apply(self) -> dict:
        """Optimizer step on the accumulated gradients; returns {"grad_norm": ...}."""

    def evaluate(self, x, targets=None):
        """Forward without keeping residuals: hidden states, or the loss at the last stage."""

    def save(self, directory) -> None:
        """Writes the module's parameters and optimizer state into a checkpoint directory."""

    def load(self, directory) -> None:
        """Restores parameters and optimizer state from a checkpoint directory."""


def _apply_module(graphdef, kind, state, x, targets):
    m = nnx.merge(graphdef, state)
    if kind == "decoding":
        return m.loss(x, targets)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return m(x, positions)


def _forward(graphdef, kind, state, x, targets):
    f = functools.partial(_apply_module, graphdef, kind)
    if kind == "embedding":  # integer inputs: differentiate w.r.t. the parameters only
        y, vjp = jax.vjp(lambda s: f(s, x, targets), state)
    else:
        y, vjp = jax.vjp(lambda s, h: f(s, h, targets), state, x)
    return y, vjp


def _forward_frozen(graphdef, kind, state, x, targets, input_grad):
    """A frozen stage's forward: a VJP w.r.t. the input only (none when nothing upstream learns)."""
    f = functools.partial(_apply_module, graphdef, kind)
    if kind == "embedding" or not input_grad:
        return f(state, x, targets), None
    return jax.vjp(lambda h: f(state, h, targets), x)


def _backward(vjp, grad, acc):
    grads = vjp(grad)
    g_state, g_x = grads[0], (grads[1] if len(grads) > 1 else None)
    return g_x, jax.tree.map(jnp.add, acc, g_state)


def _update(tx, state, opt_state, acc):
    updates, opt_state = tx.update(acc, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, optax.global_norm(acc)


_forward_jit = jax.jit(_forward, static_argnums=(0, 1))
_forward_frozen_jit = jax.jit(_forward_frozen, static_argnums=(0, 1, 5))
_apply_jit = jax.jit(_apply_module, static_argnums=(0, 1))
_backward_jit = jax.jit(_backward, donate_argnums=2)
_backward_frozen_jit = jax.jit(lambda vjp, grad: vjp(grad)[0])


class LocalStage:
    """A pipeline stage in this process, over a ModuleRuntime (shares its parameters).

    A frozen stage still passes gradients to the stage before it (unless `input_grad` is False:
    nothing upstream learns), but accumulates and applies nothing to its own parameters.
    """

    def __init__(
        self,
        runtime: ModuleRuntime,
        tx: optax.GradientTransformation,
        *,
        frozen: bool = False,
        input_grad: bool = True,
    ):
        self.rt, self.tx = runtime, tx
        self.frozen, self.input_grad = frozen, input_grad
        self.name, self.kind = runtime.name, runtime.cfg.kind
        g, k = runtime.graphdef, self.kind
        # Module-level jits with static graphdefs: equal modules share compiled programs.
        self._fwd = functools.partial(_forward_jit, g, k)
        self._fwd_frozen = functools.partial(_forward_frozen_jit, g, k)
        self._eval = functools.partial(_apply_jit, g, k)
        self._upd = jax.jit(functools.partial(_update, tx), donate_argnums=(0, 1, 2))
        self.opt_state = tx.init(runtime.state)
        self._acc = jax.tree.map(jnp.zeros_like, runtime.state)
        self._vjps: dict[int, Any] = {}

    def forward(self, mb: int, x, targets=None):
        if mb in self._vjps:
            raise ValueError(f"stage {self.name!r}: micro-batch {mb} already has a forward pending")
        t = None if targets is None else jnp.asarray(targets)
        if self.frozen:
            y, self._vjps[mb] = self._fwd_frozen(self.rt.state, jnp.asarray(x), t, self.input_grad)
        else:
            y, self._vjps[mb] = self._fwd(self.rt.state, jnp.asarray(x), t)
        return y

    @property
    def pending(self) -> list[int]:
        """Micro-batches whose forward ran and whose backward has not yet."""
        return sorted(self._vjps)

    def freeze(self, frozen: bool = True, input_grad: bool = True) -> None:
        """Stops (or resumes) updates to this stage's parameters between steps."""
        if self._vjps:
            raise ValueError(
                f"stage {self.name!r}: cannot (un)freeze with micro-batches "
                f"{sorted(self._vjps)} in flight"
            )
        self.frozen, self.input_grad = frozen, input_grad

    def backward(self, mb: int, grad):
        if mb not in self._vjps:
            raise KeyError(f"stage {self.name!r}: no forward pending for micro-batch {mb}")
        vjp = self._vjps.pop(mb)
        if self.frozen:
            return (
                None if vjp is None else _backward_frozen_jit(vjp, jnp.asarray(grad, jnp.float32))
            )
        g_x, self._acc = _backward_jit(vjp, jnp.asarray(grad, jnp.float32), self._acc)
        return g_x

    def accumulated(self):
        return self._acc

    def apply(self) -> dict:
        if self._vjps:
            raise ValueError(
                f"stage {self.name!r}: apply with micro-batches "
                f"{sorted(self._vjps)} still awaiting backward"
            )
        if self.frozen:
            return {"grad_norm": 0.0}
        state, self.opt_state, norm = self._upd(self.rt.state, self.opt_state, self._acc)
        self.rt.state = state
        self._acc = jax.tree.map(jnp.zeros_like, state)
        return {"grad_norm": float(norm)}

    def reset(self) -> None:
        """Drops micro-batches in flight and accumulated gradients (after a failed step)."""
        self._vjps.clear()
        self._acc = jax.tree.map(jnp.zeros_like, self.rt.state)

    def optimizer_leaves(self) -> dict[str, np.ndarray]:
        return {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(self.opt_state))}

    def load_optimizer_leaves(self, leaves: dict[str, np.ndarray]) -> None:
        flat, treedef = jax.tree.flatten(self.opt_state)
        if len(leaves) != len(flat):
            raise ValueError(
                f"stage {self.name!r}: optimizer state has {len(leaves)} arrays, "
                f"expected {len(flat)}"
            )
        self.opt_state = jax.tree.unflatten(
            treedef, [jnp.asarray(leaves[str(i)]) for i in range(len(flat))]
        )

    def evaluate(self, x, targets=None):
        """Forward without keeping residuals (eval): hidden states, or the loss at the last stage."""
        return self._eval(
            self.rt.state, jnp.asarray(x), None if targets is None else jnp.asarray(targets)
        )

    def save(self, directory) -> None:
        """Writes this module's parameters and optimizer state into a checkpoint directory."""
        from pathlib import Path

        from pathways import checkpoint as ckpt

        ckpt.save_module(directory, self.name, self.rt.state)
        ckpt.save_tree(Path(directory) / "train" / self.name, self.optimizer_leaves())

    def load(self, directory) -> None:
        from pathlib import Path

        from pathways import checkpoint as ckpt

        self.rt.state = ckpt.load_module(directory, self.name, self.rt.state)
        opt = Path(directory) / "train" / self.name
        if opt.exists():  # a serving checkpoint has parameters only: keep a fresh optimizer
            self.load_optimizer_leaves(ckpt.load_tree(opt, self.optimizer_leaves()))
        else:
            self.opt_state = self.tx.init(self.rt.state)
        self.reset()
