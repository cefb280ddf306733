"""Module kinds of a pathway: each maps a config dataclass to a Flax NNX module."""

from __future__ import annotations

from typing import Any

from flax import nnx

from pathways.modules.attention import Attention, AttentionConfig
from pathways.modules.config import ConfigError, from_dict
from pathways.modules.decoding import Decoding, DecodingConfig
from pathways.modules.embedding import Embedding, EmbeddingConfig

KINDS: dict[str, tuple[type, type]] = {
    "embedding": (EmbeddingConfig, Embedding),
    "attention": (AttentionConfig, Attention),
    "decoding": (DecodingConfig, Decoding),
}

ModuleConfig = EmbeddingConfig | AttentionConfig | DecodingConfig


def config_from_dict(data: dict[str, Any], where: str = "") -> ModuleConfig:
    """Parses {"kind": ..., **fields} into the kind's config dataclass."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in KINDS:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}kind must be one of {', '.join(KINDS)}; got {kind!r}")
    return from_dict(KINDS[kind][0], data, where)


def build(cfg: ModuleConfig, seed: int = 0) -> nnx.Module:
    """Instantiates the module for `cfg` with freshly initialised parameters."""
    return KINDS[cfg.kind][1](cfg, nnx.Rngs(seed))


__all__ = [
    "KINDS",
    "ConfigError",
    "ModuleConfig",
    "build",
    "config_from_dict",
    "AttentionConfig",
    "DecodingConfig",
    "EmbeddingConfig",
]
