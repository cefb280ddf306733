"""`classification` head: hidden states (B, T, D) -> mean over positions -> class logits (B, C).

Its targets are labels (B,) int32; `loss` is their mean cross-entropy.
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


@dataclasses.dataclass(frozen=True)
class ClassificationConfig:
    d_model: int
    n_classes: int
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    init_std: float = 0.02
    kind: str = dataclasses.field(default="classification", init=False)

    def __post_init__(self):
        positive_int("d_model", self.d_model)
        positive_int("n_classes", self.n_classes)
        require(self.n_classes >= 2, f"n_classes must be at least 2, got {self.n_classes}")
        one_of("norm", self.norm, NORMS)
        positive_number("norm_eps", self.norm_eps)
        positive_number("init_std", self.init_std)

    @property
    def input_contract(self) -> tuple[str, int]:
        return ("hidden", self.d_model)

    @property
    def output_contract(self) -> tuple[str, int]:
        return ("classes", self.n_classes)


class Classification(nnx.Module):
    def __init__(self, cfg: ClassificationConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, rngs)
        self.head = dense(cfg.d_model, cfg.n_classes, bias=True, std=cfg.init_std, rngs=rngs)

    def __call__(self, h_btd: jax.Array) -> jax.Array:
        if h_btd.ndim != 3:
            raise ValueError(
                f"classification pools hidden states of shape (B, T, D); got {h_btd.shape}"
            )
        pooled_bd = self.norm(h_btd).mean(axis=1)
        return self.head(pooled_bd).astype(jnp.float32)  # (B, C)

    def step(self, h_btd, positions=None, cache=None, slots=None, window=None, causal=True):
        """The kind's one step (see `modules.kind`): class logits (B, C); no cache."""
        return self(h_btd), None

    def loss(self, h_btd: jax.Array, labels_b: jax.Array, mask_b: jax.Array | None = None):
        """Mean cross-entropy of the labels (B,) over examples where mask is 1 (all if None)."""
        ce = optax.softmax_cross_entropy_with_integer_labels(self(h_btd), labels_b)
        if mask_b is None:
            return ce.mean()
        mask = mask_b.astype(jnp.float32)
        return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    def probabilities(self, h_btd: jax.Array) -> jax.Array:
        """Softmax over the classes, (B, C)."""
        return jax.nn.softmax(self(h_btd), axis=-1)

    def predict(self, h_btd: jax.Array) -> jax.Array:
        """The most likely class of each example, (B,) int32."""
        return jnp.argmax(self(h_btd), axis=-1).astype(jnp.int32)


KIND = registry.register(
    Kind(
        "classification",
        ClassificationConfig,
        Classification,
        is_head=True,
        details=lambda c: f"{c.n_classes} classes, mean pooling, {c.norm}",
    )
)
