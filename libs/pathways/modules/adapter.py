"""`adapter` kind: a small residual bottleneck, hidden (B, T, D) -> hidden (B, T, D).

y = x + up(gelu(down(norm(x)))), with `up` zero-initialised, so a fresh adapter is the identity
and can be inserted into a trained pathway. A task gets its own adapters beside attention
modules it shares with other tasks (issue 19): they learn what the task needs from the shared
stack while the shared modules stay as another task trained them, and they stay modules of
their own (checkpointed, served and counted like any other).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from pathways.config import one_of, positive_int, positive_number
from pathways.modules import registry
from pathways.modules.kind import Kind
from pathways.modules.layers import NORMS, dense, make_norm


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    d_model: int
    bottleneck: int = 16
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    init_std: float = 0.02
    kind: str = dataclasses.field(default="adapter", init=False)

    def __post_init__(self):
        positive_int("d_model", self.d_model)
        positive_int("bottleneck", self.bottleneck)
        one_of("norm", self.norm, NORMS)
        positive_number("norm_eps", self.norm_eps)
        positive_number("init_std", self.init_std)

    @property
    def input_contract(self) -> tuple[str, int]:
        return ("hidden", self.d_model)

    @property
    def output_contract(self) -> tuple[str, int]:
        return ("hidden", self.d_model)


class Adapter(nnx.Module):
    def __init__(self, cfg: AdapterConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, rngs)
        self.down = dense(cfg.d_model, cfg.bottleneck, bias=True, std=cfg.init_std, rngs=rngs)
        self.up = dense(cfg.bottleneck, cfg.d_model, bias=True, std=0.0, rngs=rngs)  # zeros

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        r_btr = jax.nn.gelu(self.down(self.norm(x_btd)), approximate=True)
        return x_btd + self.up(r_btr).astype(x_btd.dtype)

    def step(self, x_btd, positions=None, cache=None, slots=None, window=None, causal=True):
        """The kind's one step (see `modules.kind`): per position, so any mask; no cache."""
        return self(x_btd), None


KIND = registry.register(
    Kind(
        "adapter",
        AdapterConfig,
        Adapter,
        identity=lambda c: c,  # a fresh adapter adds zero
        details=lambda c: f"residual bottleneck {c.d_model} -> {c.bottleneck} -> {c.d_model}",
    )
)
