"""`action` head: hidden states (B, T, D) -> one action per time step, learned by behaviour
cloning (imitating an expert's actions).

- space "discrete": scores of `actions` choices (a categorical policy); the loss is the mean
  cross-entropy of the expert's choices; acting takes the most likely one.
- space "continuous": the mean of a Gaussian over `actions` values with a fixed variance, so
  the loss is the mean squared error to the expert's actions; `squash: tanh` bounds the mean
  to [-1, 1] (actions that saturate, e.g. torques); acting takes the mean.

Targets at padding steps are skipped: -1 for discrete actions, NaN for continuous ones.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pathways.config import one_of, positive_int, positive_number, require
from pathways.modules import registry
from pathways.modules.kind import Kind
from pathways.modules.layers import NORMS, dense, make_norm

SPACES = ("discrete", "continuous")
SQUASHES = ("none", "tanh")


@dataclasses.dataclass(frozen=True)
class ActionConfig:
    d_model: int
    space: str  # "discrete" or "continuous"
    actions: int  # discrete: choices; continuous: values per action
    squash: str = "none"  # continuous: "tanh" bounds the mean to [-1, 1]
    hidden: int = 0  # a hidden layer's width before the output (0: none)
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    init_std: float = 0.02
    kind: str = dataclasses.field(default="action", init=False)

    def __post_init__(self):
        positive_int("d_model", self.d_model)
        one_of("space", self.space, SPACES)
        positive_int("actions", self.actions)
        one_of("squash", self.squash, SQUASHES)
        if self.space == "discrete":
            require(self.actions >= 2, f"a discrete space needs >= 2 actions, got {self.actions}")
            require(
                self.squash == "none",
                f"squash {self.squash!r} is for continuous actions; space is discrete",
            )
        require(
            isinstance(self.hidden, int) and self.hidden >= 0,
            f"hidden must be a non-negative integer, got {self.hidden!r}",
        )
        one_of("norm", self.norm, NORMS)
        positive_number("norm_eps", self.norm_eps)
        positive_number("init_std", self.init_std)

    @property
    def input_contract(self) -> tuple[str, int]:
        return ("hidden", self.d_model)

    @property
    def output_contract(self) -> tuple[str, int]:
        return ("actions", self.actions)


class Action(nnx.Module):
    def __init__(self, cfg: ActionConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, rngs)
        width = cfg.d_model
        if cfg.hidden:
            self.fc = dense(width, cfg.hidden, bias=True, std=cfg.init_std, rngs=rngs)
            width = cfg.hidden
        self.head = dense(width, cfg.actions, bias=True, std=cfg.init_std, rngs=rngs)

    def __call__(self, h_btd: jax.Array) -> jax.Array:
        """Per step: discrete scores (logits) or the continuous mean, (..., actions) float32."""
        x = self.norm(h_btd)
        if self.cfg.hidden:
            x = jax.nn.gelu(self.fc(x))
        y = self.head(x).astype(jnp.float32)
        return jnp.tanh(y) if self.cfg.squash == "tanh" else y

    def step(self, h_btd, positions=None, cache=None, slots=None, window=None, causal=True):
        """The kind's one step (see `modules.kind`): outputs per step; no cache."""
        return self(h_btd), None

    def loss(self, h_btd: jax.Array, targets, mask: jax.Array | None = None):
        """Behaviour cloning: mean cross-entropy (discrete, targets (B, T) int32) or mean
        squared error over the action values (continuous, targets (B, T, A)), over the steps
        whose target is not padding (-1 / NaN) and where `mask` (B, T) is 1."""
        out = self(h_btd)
        if self.cfg.space == "discrete":
            valid = targets >= 0
            per_step = optax.softmax_cross_entropy_with_integer_labels(
                out, jnp.where(valid, targets, 0)
            )
        else:
            valid = ~jnp.isnan(targets).any(axis=-1)
            safe = jnp.where(valid[..., None], targets, 0.0)  # NaN never reaches a gradient
            per_step = jnp.mean(jnp.square(out - safe), axis=-1)
        w = valid.astype(jnp.float32)
        if mask is not None:
            w = w * mask.astype(jnp.float32)
        return (per_step * w).sum() / jnp.maximum(w.sum(), 1.0)

    def act(self, h_btd: jax.Array) -> jax.Array:
        """The action taken: the most likely choice (int32) or the mean clipped to [-1, 1]."""
        out = self(h_btd)
        if self.cfg.space == "discrete":
            return jnp.argmax(out, axis=-1).astype(jnp.int32)
        return jnp.clip(out, -1.0, 1.0)


def choose(outputs, discrete: bool):
    """The action one step's outputs (A,) mean, outside JAX (`Action.act` on numpy): the most
    likely choice (an int), or the mean clipped to [-1, 1] (float32 (A,))."""
    import numpy as np

    if discrete:
        return int(np.argmax(outputs))
    return np.clip(outputs, -1.0, 1.0).astype(np.float32)


KIND = registry.register(
    Kind(
        "action",
        ActionConfig,
        Action,
        is_head=True,
        details=lambda c: f"{c.space}, {c.actions} action{'s' if c.actions > 1 else ''}"
        + (f", {c.squash}" if c.squash != "none" else ""),
    )
)
