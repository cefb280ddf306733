"""Tests for parsing module configs from plain dicts (as a spec file holds them)."""

import pytest

from pathways import modules
from pathways.config import to_dict
from pathways.modules import AttentionConfig, ConfigError, EmbeddingConfig


def test_config_from_dict_builds_each_kind():
    cfg = modules.config_from_dict(
        {
            "kind": "attention",
            "d_model": 36,
            "n_layers": 5,
            "n_heads": 3,
            "max_seq_len": 16,
            "mlp": "swiglu",
        }
    )
    assert cfg == AttentionConfig(d_model=36, n_layers=5, n_heads=3, max_seq_len=16, mlp="swiglu")
    emb = modules.config_from_dict(
        {"kind": "embedding", "vocab_size": 37, "d_model": 24, "max_seq_len": 16}
    )
    assert emb.kind == "embedding"
    dec = modules.config_from_dict({"kind": "decoding", "d_model": 24, "vocab_size": 37})
    assert (dec.kind, dec.vocab_size) == ("decoding", 37)


def test_to_dict_round_trips():
    cfg = AttentionConfig(d_model=36, n_layers=5, n_heads=3, n_kv_heads=1, max_seq_len=16)
    assert modules.config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, words",
    [
        ({"kind": "convolution"}, ["kind", "'convolution'", "embedding"]),
        ({"d_model": 24}, ["kind", "None"]),
        (
            {"kind": "embedding", "vocab_size": 37, "d_model": 24, "max_seq_len": 16, "heads": 3},
            ["unknown field", "heads", "EmbeddingConfig"],
        ),
        ({"kind": "embedding", "vocab_size": 37}, ["missing field", "d_model", "max_seq_len"]),
        ({"kind": "decoding", "d_model": 24, "vocab_size": 0}, ["mod 'x'", "vocab_size", "0"]),
        (
            {"kind": "decoding", "d_model": 24, "vocab_size": 37, "init_std": "0.02"},
            ["mod 'x'", "init_std", "'0.02'"],
        ),
        (
            {
                "kind": "embedding",
                "vocab_size": 37,
                "d_model": 24,
                "max_seq_len": 16,
                "init_std": True,
            },
            ["init_std", "True"],
        ),
    ],
)
def test_errors_name_the_field_and_value(data, words):
    with pytest.raises(ConfigError) as e:
        modules.config_from_dict(data, where="mod 'x'")
    for w in words:
        assert w in str(e.value)


def test_build_makes_the_module_of_each_kind():
    m = modules.build(EmbeddingConfig(vocab_size=37, d_model=24, max_seq_len=16), seed=3)
    assert type(m).__name__ == "Embedding"
