"""Module kinds of a pathway: each maps a config dataclass to a Flax NNX module (`modules.kind`);
kinds are looked up by name in `modules.registry`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pathways.config import ConfigError, from_dict

# Importing the built-in kinds registers them.
from pathways.modules import registry
from pathways.modules.action import ActionConfig
from pathways.modules.adapter import AdapterConfig
from pathways.modules.attention import AttentionConfig
from pathways.modules.audio_embedding import AudioEmbeddingConfig
from pathways.modules.classification import ClassificationConfig
from pathways.modules.ctc import CtcConfig
from pathways.modules.decoding import DecodingConfig
from pathways.modules.embedding import EmbeddingConfig
from pathways.modules.image_embedding import ImageEmbeddingConfig
from pathways.modules.kind import Kind
from pathways.modules.observation_embedding import ObservationEmbeddingConfig

# Any registered kind's config; these are built in.
ModuleConfig = (
    EmbeddingConfig
    | ImageEmbeddingConfig
    | AttentionConfig
    | DecodingConfig
    | ClassificationConfig
    | AudioEmbeddingConfig
    | CtcConfig
    | ObservationEmbeddingConfig
    | ActionConfig
    | AdapterConfig
    | Any
)


def config_from_dict(data: dict[str, Any], where: str = "") -> ModuleConfig:
    """Parses {"kind": ..., **fields} into the kind's config dataclass."""
    data = dict(data)
    kind = data.pop("kind", None)
    try:
        cls = registry.get(kind).config
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    return from_dict(cls, data, where)


def positions(x) -> jax.Array:
    """(B, T) positions 0..T-1 of every row of x (B, T, ...): a stateless call's."""
    return jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])


def forward(module: nnx.Module, x, *, causal: bool = True):
    """A module's stateless step over x at positions 0..T-1 (training, distillation, whole
    batches): its output only. `causal` is the call's attention mask (the pathway's)."""
    return module.step(x, positions(x), causal=causal)[0]


def build(cfg: ModuleConfig, seed: int = 0) -> nnx.Module:
    """Instantiates the module for `cfg` with freshly initialised parameters."""
    return registry.of(cfg).build(cfg, seed)


def abstract(cfg: ModuleConfig) -> nnx.Module:
    """The module for `cfg` with only its parameters' shapes and dtypes (`jax.ShapeDtypeStruct`):
    nothing is initialised or allocated (`nnx.eval_shape` of `build`). What a checkpoint is
    restored into, so that a process loading weights never holds random ones beside them."""
    return nnx.eval_shape(lambda: build(cfg))


def from_state(cfg: ModuleConfig, state: nnx.State) -> nnx.Module:
    """The module for `cfg` holding `state` (e.g. `checkpoint.restore_module`'s arrays, used as
    they are, not copied); its structure is `abstract(cfg)`'s, so no parameters are built."""
    graphdef, _ = nnx.split(abstract(cfg))
    return nnx.merge(graphdef, state)


__all__ = [
    "ConfigError",
    "Kind",
    "ModuleConfig",
    "abstract",
    "build",
    "forward",
    "from_state",
    "positions",
    "config_from_dict",
    "registry",
    "ActionConfig",
    "AdapterConfig",
    "AttentionConfig",
    "AudioEmbeddingConfig",
    "ClassificationConfig",
    "CtcConfig",
    "DecodingConfig",
    "EmbeddingConfig",
    "ImageEmbeddingConfig",
    "ObservationEmbeddingConfig",
]
