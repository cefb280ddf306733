"""One module as a pipeline stage: forward/backward over micro-batches, its own optimizer.

A stage owns its parameters, its optimizer state, its gradient accumulator and the residuals of
the micro-batches in flight. Only activations and activation-gradients enter or leave it.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pathways import modules as mod
from pathways import names
from pathways.runtime import ModuleRuntime


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


def _apply_module(graphdef, is_head, causal, state, x, targets):
    m = nnx.merge(graphdef, state)
    if is_head:
        return m.loss(x, targets)
    return mod.forward(m, x, causal=causal)


def _backward(graphdef, is_head, causal, state, x, targets, grad, acc):
    """Recomputes the stage's forward from its saved input and backpropagates `grad`, in one
    program; adds the parameter gradients to `acc`. Returns (gradient w.r.t. x or None, acc).

    Recomputing is cheaper than keeping the forward's VJP: a forward + backward compiled together
    took 11.3 ms for a tiny attention stage where the VJP closure's backward alone took 15.6 ms,
    and only the input stays in memory between a micro-batch's forward and its backward.
    """
    f = functools.partial(_apply_module, graphdef, is_head, causal)
    if jnp.issubdtype(x.dtype, jnp.integer):  # tokens: differentiate w.r.t. the parameters only
        _, vjp = jax.vjp(lambda s: f(s, x, targets), state)
        (g_state,), g_x = vjp(grad), None
    else:
        _, vjp = jax.vjp(lambda s, h: f(s, h, targets), state, x)
        g_state, g_x = vjp(grad)
    return g_x, jax.tree.map(jnp.add, acc, g_state)


def _backward_frozen(graphdef, is_head, causal, state, x, targets, grad):
    """A frozen stage's backward: the gradient w.r.t. its input only."""
    f = functools.partial(_apply_module, graphdef, is_head, causal)
    _, vjp = jax.vjp(lambda h: f(state, h, targets), x)
    return vjp(grad)[0]


def _update(tx, state, opt_state, acc, scale):
    updates, opt_state = tx.update(acc, opt_state, state)
    updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)  # x 1: bit-identical
    return optax.apply_updates(state, updates), opt_state, optax.global_norm(acc)


_STAGE_JITS: dict[Any, SimpleNamespace] = {}


def _stage_jits(graphdef, is_head: bool, causal: bool = True) -> SimpleNamespace:
    """Jitted closures over (graphdef, whether it is a head: its forward is the loss, the
    pathway's attention mask), made once per distinct module structure and mask.

    Equal modules share compiled programs; the graphdef is hashed here once, not on every call
    as a static argument would be.
    """
    key = (graphdef, is_head, causal)
    if key not in _STAGE_JITS:
        args = (graphdef, is_head, causal)
        _STAGE_JITS[key] = SimpleNamespace(
            forward=jax.jit(lambda state, x, t: _apply_module(*args, state, x, t)),
            backward=jax.jit(
                lambda state, x, t, g, acc: _backward(*args, state, x, t, g, acc),
                donate_argnums=4,
            ),
            backward_frozen=jax.jit(lambda state, x, t, g: _backward_frozen(*args, state, x, t, g)),
        )
    return _STAGE_JITS[key]


def _arg(x, dtype=None):
    """An input for a jitted call: jax arrays as they are, anything else as numpy.

    (jnp.asarray would dispatch an eager device_put per call; jit takes numpy directly.)
    """
    if x is None:
        return None
    if isinstance(x, jax.Array):
        return x if dtype is None or x.dtype == dtype else x.astype(dtype)
    return np.asarray(x, dtype)


class LocalStage:
    """A pipeline stage in this process, over a ModuleRuntime (shares its parameters).

    A frozen stage still passes gradients to the stage before it (unless `input_grad` is False:
    nothing upstream learns), but accumulates and applies nothing to its own parameters.
    `causal` is the attention mask of the pathway the stage trains (False: images, utterances).
    """

    def __init__(
        self,
        runtime: ModuleRuntime,
        tx: optax.GradientTransformation | dict[str, optax.GradientTransformation],
        *,
        frozen: bool = False,
        input_grad: bool = True,
        causal: bool = True,
    ):
        self.rt = runtime  # self.tx: the current optimizer (below)
        self.frozen, self.input_grad = frozen, input_grad
        self.name, self.kind = runtime.name, runtime.kind.name
        # A stage fed the pathway's input (tokens, images) has no input gradient to pass back.
        self._takes_tokens = runtime.cfg.input_contract[0] != "hidden"
        self.causal = causal
        # Factor of the next updates (the learning rate's): a task's mixing weight on a module
        # it shares with other tasks (`multitask`); 1 otherwise.
        self.lr_scale = 1.0
        self._jits = _stage_jits(runtime.graphdef, runtime.kind.is_head, causal)
        # The optimizer the next apply uses (tx, its update program, opt_state) is named
        # `optimizer`; "" unless set_optimizers gave the stage several (multi-task runs: each
        # task's own AdamW state of a module the tasks share); the others wait in _parked.
        self.optimizer = ""
        self._parked: dict[str, tuple] = {}
        if isinstance(tx, dict):  # named optimizers from the start: no unused default state
            self.set_optimizers(tx)
        else:
            self._set_current(tx, tx.init(runtime.state))
        self._acc = jax.tree.map(jnp.zeros_like, runtime.state)
        # Micro-batches in flight: their inputs (and targets), None when no backward will run.
        self._saved: dict[int, tuple | None] = {}

    def _set_current(self, tx, opt_state) -> None:
        self.tx, self.opt_state = tx, opt_state
        # The accumulator is not donated: nothing returned has its place (it is zeroed afresh).
        self._upd = jax.jit(functools.partial(_update, tx), donate_argnums=(0, 1))

    @property
    def optimizers(self) -> list[str]:
        """The names of this stage's optimizers, the current one first."""
        return [self.optimizer, *self._parked]

    def set_optimizers(self, txs: dict[str, optax.GradientTransformation]) -> None:
        """Replaces the stage's optimizer by one per name (fresh states; names as pathways
        are named), the first one current; `use` switches between them."""
        if not txs:
            raise ValueError(f"stage {self.name!r}: set_optimizers needs at least one")
        for key in txs:
            names.check(key, "optimizer name")
        self._parked = {}
        for key, tx in txs.items():
            self._set_current(tx, tx.init(self.rt.state))
            self._parked[key] = (self.tx, self._upd, self.opt_state)
        self.optimizer = next(iter(txs))
        self.tx, self._upd, self.opt_state = self._parked.pop(self.optimizer)

    def use(self, key: str) -> None:
        """Makes optimizer `key` the one the next apply steps (between steps only)."""
        if key == self.optimizer:
            return
        if key not in self._parked:
            raise ValueError(
                f"stage {self.name!r} has no optimizer {key!r}; it has "
                f"{', '.join(repr(k) for k in self.optimizers)}"
            )
        self._parked[self.optimizer] = (self.tx, self._upd, self.opt_state)
        self.optimizer = key
        self.tx, self._upd, self.opt_state = self._parked.pop(key)

    def forward(self, mb: int, x, targets=None):
        if mb in self._saved:
            raise ValueError(f"stage {self.name!r}: micro-batch {mb} already has a forward pending")
        t, x = _arg(targets), _arg(x)
        needs_backward = not self.frozen or (not self._takes_tokens and self.input_grad)
        self._saved[mb] = (x, t) if needs_backward else None
        return self._jits.forward(self.rt.state, x, t)

    def set_causal(self, causal: bool) -> None:
        """Trains with another attention mask from now on (pathways of different masks sharing
        this module, one step each in turn); only between steps."""
        if causal == self.causal:
            return
        if self._saved:
            raise ValueError(
                f"stage {self.name!r}: the mask changes between steps only; micro-batches "
                f"{self.pending} have a forward pending"
            )
        self.causal = causal
        self._jits = _stage_jits(self.rt.graphdef, self.rt.kind.is_head, causal)

    @property
    def pending(self) -> list[int]:
        """Micro-batches whose forward ran and whose backward has not yet."""
        return sorted(self._saved)

    def freeze(self, frozen: bool = True, input_grad: bool = True) -> None:
        """Stops (or resumes) updates to this stage's parameters between steps."""
        if self._saved:
            raise ValueError(
                f"stage {self.name!r}: cannot (un)freeze with micro-batches "
                f"{sorted(self._saved)} in flight"
            )
        self.frozen, self.input_grad = frozen, input_grad

    def backward(self, mb: int, grad):
        if mb not in self._saved:
            raise KeyError(f"stage {self.name!r}: no forward pending for micro-batch {mb}")
        saved = self._saved.pop(mb)
        if saved is None:
            return None
        x, t = saved
        g = _arg(grad, np.float32)
        if self.frozen:
            return self._jits.backward_frozen(self.rt.state, x, t, g)
        g_x, self._acc = self._jits.backward(self.rt.state, x, t, g, self._acc)
        return g_x

    def accumulated(self):
        return self._acc

    def apply(self) -> dict:
        if self._saved:
            raise ValueError(
                f"stage {self.name!r}: apply with micro-batches "
                f"{sorted(self._saved)} still awaiting backward"
            )
        if self.frozen:
            return {"grad_norm": 0.0}
        scale = np.float32(self.lr_scale)
        state, self.opt_state, norm = self._upd(self.rt.state, self.opt_state, self._acc, scale)
        self.rt.state = state
        self._acc = jax.tree.map(jnp.zeros_like, state)
        return {"grad_norm": float(norm)}

    def reset(self) -> None:
        """Drops micro-batches in flight and accumulated gradients (after a failed step)."""
        self._saved.clear()
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
        return self._jits.forward(self.rt.state, _arg(x), _arg(targets))

    def save(self, directory) -> None:
        """Writes this module's parameters and optimizer state into a checkpoint directory."""
        from pathways import checkpoint as ckpt

        ckpt.save_module(directory, self.name, self.rt.state)
        current = self.optimizer
        for key in self.optimizers:  # named ones: train/<module>@<name> ('@' is in no name)
            self.use(key)
            ckpt.save_tree(_optimizer_dir(directory, self.name, key), self.optimizer_leaves())
        self.use(current)

    def load(self, directory) -> None:
        from pathways import checkpoint as ckpt

        self.rt.state = ckpt.load_module(directory, self.name, self.rt.state)
        current = self.optimizer
        for key in self.optimizers:
            self.use(key)
            opt = _optimizer_dir(directory, self.name, key)
            if opt.exists():  # a serving checkpoint has parameters only: keep a fresh optimizer
                self.load_optimizer_leaves(ckpt.load_tree(opt, self.optimizer_leaves()))
            else:
                self.opt_state = self.tx.init(self.rt.state)
        self.use(current)
        self.reset()


def _optimizer_dir(directory, module: str, key: str):
    """Where a module's optimizer state lives in a checkpoint: train/<module>, or for a named
    optimizer (a task's) train/<module>@<name>."""
    from pathlib import Path

    return Path(directory) / "train" / (f"{module}@{key}" if key else module)
