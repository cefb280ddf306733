"""Module kinds of a pathway: each maps a config dataclass to a Flax NNX module (`modules.kind`);
kinds are looked up by name in `modules.registry`."""

from __future__ import annotations

from typing import Any

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


def build(cfg: ModuleConfig, seed: int = 0) -> nnx.Module:
    """Instantiates the module for `cfg` with freshly initialised parameters."""
    return registry.of(cfg).build(cfg, seed)


__all__ = [
    "ConfigError",
    "Kind",
    "ModuleConfig",
    "build",
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
