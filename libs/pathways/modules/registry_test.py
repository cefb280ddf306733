"""Tests for the kind registry: look-ups by name, conflicting registrations, malformed kinds."""

from __future__ import annotations

import dataclasses

import pytest
from flax import nnx

from pathways import modules as mod
from pathways.config import ConfigError
from pathways.modules import registry
from pathways.modules.kind import Kind


def test_built_in_kinds_answer_for_themselves():
    emb, attn, head = (registry.get(n) for n in ("embedding", "attention", "decoding"))
    assert (emb.has_cache, attn.has_cache, head.has_cache) == (False, True, False)
    assert (emb.is_head, attn.is_head, head.is_head) == (False, False, True)
    cfg = mod.AttentionConfig(d_model=12, n_layers=1, n_heads=3, max_seq_len=8)
    assert registry.of(cfg) is attn and attn.identity(cfg).zero_init_output
    assert emb.identity is None and head.identity is None
    assert str(attn) == "attention"


def test_an_unknown_kind_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"kind must be one of .*attention.*; got 'nope'"):
        registry.get("nope")
    with pytest.raises(ConfigError, match=r"module 'x': kind must be one of .*; got None"):
        mod.config_from_dict({"d_model": 4}, where="module 'x'")


@dataclasses.dataclass(frozen=True)
class _OtherConfig:
    d_model: int
    kind: str = dataclasses.field(default="attention", init=False)


class _Other(nnx.Module):
    def __init__(self, cfg, rngs):
        self.cfg = cfg

    def step(self, x, positions, cache=None, slots=None, window=None):
        return x, None


def test_a_taken_name_cannot_be_registered_by_another_definition():
    with pytest.raises(ValueError, match="kind 'attention' is already registered"):
        registry.register(Kind("attention", _OtherConfig, _Other))
    assert registry.get("attention").module is mod.attention.Attention


def test_malformed_kinds_are_refused_by_name():
    with pytest.raises(ValueError, match="field `kind` defaulting to 'other'"):
        Kind("other", _OtherConfig, _Other)
    with pytest.raises(ValueError, match="a head's module must have loss"):
        Kind("attention", _OtherConfig, _Other, is_head=True)


def test_bad_plugin_paths_are_named():
    with pytest.raises(ConfigError, match="plugin 'a b' must be a dotted Python module path"):
        registry.load_plugins(["a b"])
    with pytest.raises(ConfigError, match="plugin 'pathways.nope' cannot be imported"):
        registry.load_plugins(["pathways.nope"])
