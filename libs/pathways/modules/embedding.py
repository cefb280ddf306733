"""`embedding` module: token ids (B, T) and positions (B, T) -> hidden states (B, T, D)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pathways import weights
from pathways.config import one_of, positive_int, positive_number
from pathways.modules import registry
from pathways.modules.kind import Kind


@dataclasses.dataclass(frozen=True)
class EmbeddingConfig:
    vocab_size: int
    d_model: int
    max_seq_len: int
    # "learned": GPT-2 style absolute position table; "none": positions are applied later (RoPE).
    positions: str = "learned"
    init_std: float = 0.02
    kind: str = dataclasses.field(default="embedding", init=False)

    def __post_init__(self):
        positive_int("vocab_size", self.vocab_size)
        positive_int("d_model", self.d_model)
        positive_int("max_seq_len", self.max_seq_len)
        one_of("positions", self.positions, ("learned", "none"))
        positive_number("init_std", self.init_std)

    @property
    def input_contract(self) -> tuple[str, int]:
        return ("tokens", self.vocab_size)

    @property
    def output_contract(self) -> tuple[str, int]:
        return ("hidden", self.d_model)


class Embedding(nnx.Module):
    def __init__(self, cfg: EmbeddingConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.init_std)
        self.tokens = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init, rngs=rngs)
        if cfg.positions == "learned":
            self.positions = nnx.Embed(cfg.max_seq_len, cfg.d_model, embedding_init=init, rngs=rngs)

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array) -> jax.Array:
        # The table may be a bfloat16 serving copy (`pathways.weights`): widen only the rows read.
        h_btd = weights.lookup(self.tokens.embedding[...], tokens_bt)
        if self.cfg.positions == "learned":
            # Padding positions may be out of range (== max_seq_len); clip, they are masked later.
            pos = jnp.clip(positions_bt, 0, self.cfg.max_seq_len - 1)
            h_btd = h_btd + self.positions(pos)
        return h_btd

    def step(
        self,
        tokens_bt,
        positions_bt,
        cache=None,
        slots=None,
        window=None,
        causal=True,
    ):
        """The kind's one step (see `modules.kind`): no cache, so (hidden states, None)."""
        return self(tokens_bt, positions_bt), None


def partition(cfg: EmbeddingConfig, path: tuple, shape: tuple) -> list:
    """The token table by vocabulary row where the vocabulary divides by the mesh, else by
    d_model column (257 or 50257 never divide); learned positions by d_model column."""
    if path[:1] == ("tokens",):
        return [("tp", None), (None, "tp")]
    return [(None, "tp")]


KIND = registry.register(
    Kind(
        "embedding",
        EmbeddingConfig,
        Embedding,
        details=lambda c: f"vocab {c.vocab_size}, max_seq_len {c.max_seq_len}",
        partition=partition,
    )
)
