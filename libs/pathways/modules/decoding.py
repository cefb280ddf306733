"""`decoding` module: final norm + LM head -> logits (B, T, V); cross-entropy loss."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pathways.config import one_of, positive_int, positive_number
from pathways.modules import registry
from pathways.modules.kind import Kind
from pathways.modules.layers import NORMS, dense, make_norm


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
    d_model: int
    vocab_size: int
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    bias: bool = False  # bias on the LM head (GPT-2 and Llama have none)
    init_std: float = 0.02
    kind: str = dataclasses.field(default="decoding", init=False)

    def __post_init__(self):
        positive_int("d_model", self.d_model)
        positive_int("vocab_size", self.vocab_size)
        one_of("norm", self.norm, NORMS)
        positive_number("norm_eps", self.norm_eps)
        positive_number("init_std", self.init_std)

    @property
    def input_contract(self) -> tuple[str, int]:
        return ("hidden", self.d_model)

    @property
    def output_contract(self) -> tuple[str, int]:
        return ("logits", self.vocab_size)


class Decoding(nnx.Module):
    def __init__(self, cfg: DecodingConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, rngs)
        self.head = dense(cfg.d_model, cfg.vocab_size, bias=cfg.bias, std=cfg.init_std, rngs=rngs)

    def __call__(self, h_btd: jax.Array) -> jax.Array:
        return self.head(self.norm(h_btd)).astype(jnp.float32)

    def step(self, h, positions=None, cache=None, slots=None, window=None, causal=True):
        """The kind's one step (see `modules.kind`): logits for hidden states of any leading
        shape ((B, T, D) or the sampled rows' (B, D)); positions unused, no cache."""
        return self(h), None

    def loss(self, h_btd: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array | None = None):
        """Mean token cross-entropy over positions where mask is 1 (all when mask is None)."""
        logits = self(h_btd)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets_bt)
        if mask_bt is None:
            return ce.mean()
        mask = mask_bt.astype(jnp.float32)
        return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def partition(cfg: DecodingConfig, path: tuple, shape: tuple) -> list:
    """The LM head by vocabulary column where the vocabulary divides by the mesh, else by
    d_model row (each device's partial logits are summed); the final norm replicated."""
    if path[:1] == ("head",):
        return [(None, "tp"), ("tp", None)] if path[-1] == "kernel" else [("tp",)]
    return []


KIND = registry.register(
    Kind(
        "decoding",
        DecodingConfig,
        Decoding,
        is_head=True,
        details=lambda c: f"vocab {c.vocab_size}, {c.norm}",
        partition=partition,
    )
)
