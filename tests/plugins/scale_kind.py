"""A toy module kind defined outside the library: `scale`, y = x * a learned scalar.

Importing this file registers it; a spec names it in `plugins:` so every process that loads the
spec (module servers and the gateway too) has the kind.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pathways.config import positive_int, positive_number
from pathways.modules import registry
from pathways.modules.kind import Kind


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    d_model: int
    init: float = 1.5  # not 1: the module must change what flows through it
    kind: str = dataclasses.field(default="scale", init=False)

    def __post_init__(self):
        positive_int("d_model", self.d_model)
        positive_number("init", self.init)

    @property
    def input_contract(self) -> tuple[str, int]:
        return ("hidden", self.d_model)

    @property
    def output_contract(self) -> tuple[str, int]:
        return ("hidden", self.d_model)


class Scale(nnx.Module):
    def __init__(self, cfg: ScaleConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.scale = nnx.Param(jnp.asarray(cfg.init, jnp.float32))

    def step(
        self,
        x_btd: jax.Array,
        positions_bt,
        cache=None,
        slots=None,
        window=None,
        causal=True,
    ):
        return x_btd * self.scale[...], None


KIND = registry.register(Kind("scale", ScaleConfig, Scale, details=lambda c: f"x {c.init}"))
