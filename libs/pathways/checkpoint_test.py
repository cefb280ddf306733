"""Tests for checkpoints: per-module parameter round trips, spec + tokenizer, training metadata."""

import jax
import numpy as np
import pytest
from flax import nnx

from pathways import checkpoint as ckpt
from pathways import modules as mod
from pathways import spec as spec_lib
from pathways.modules.attention import AttentionConfig
from pathways.tokenizers import BpeTokenizer, ByteTokenizer

SPEC = spec_lib.from_dict(
    {
        "modules": {
            "embed": {"kind": "embedding", "vocab_size": 37, "d_model": 24, "max_seq_len": 16},
            "head": {"kind": "decoding", "d_model": 24, "vocab_size": 37},
        },
        "pathways": {"p": ["embed", "head"]},
    }
)


def _equal(a, b) -> bool:
    return all(
        jax.tree.leaves(
            jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)
        )
    )


def test_module_round_trip_is_exact(tmp_path):
    cfg = AttentionConfig(
        d_model=24,
        n_layers=5,
        n_heads=3,
        n_kv_heads=1,
        max_seq_len=16,
        norm="rmsnorm",
        mlp="swiglu",
        positions="rope",
    )
    saved = nnx.state(mod.build(cfg, seed=1))
    ckpt.save_module(tmp_path, "attn", saved)
    assert ckpt.has_module(tmp_path, "attn") and not ckpt.has_module(tmp_path, "other")

    like = nnx.state(mod.build(cfg, seed=2))  # different values, same structure
    assert not _equal(saved, like)
    loaded = ckpt.load_module(tmp_path, "attn", like)
    assert jax.tree.structure(loaded) == jax.tree.structure(saved)
    assert _equal(loaded, saved)
    assert not _equal(like, saved)  # the template is not modified in place


def test_saving_again_replaces_the_tree(tmp_path):
    cfg = mod.EmbeddingConfig(vocab_size=37, d_model=24, max_seq_len=16)
    first, second = nnx.state(mod.build(cfg, seed=1)), nnx.state(mod.build(cfg, seed=2))
    ckpt.save_module(tmp_path, "embed", first)
    ckpt.save_module(tmp_path, "embed", second)
    assert _equal(ckpt.load_module(tmp_path, "embed", first), second)
    assert sorted(p.name for p in (tmp_path / "modules").iterdir()) == ["embed"]  # no leftovers


def test_missing_tree_is_a_clear_error(tmp_path):
    cfg = mod.EmbeddingConfig(vocab_size=37, d_model=24, max_seq_len=16)
    with pytest.raises(FileNotFoundError, match="modules/embed does not exist"):
        ckpt.load_module(tmp_path, "embed", nnx.state(mod.build(cfg)))


def test_spec_and_byte_tokenizer_round_trip(tmp_path):
    ckpt.save_spec(tmp_path, SPEC, ByteTokenizer())
    spec, tok = ckpt.load_spec(tmp_path)
    assert spec.modules == SPEC.modules and spec.pathways == SPEC.pathways
    assert isinstance(tok, ByteTokenizer)


def test_spec_and_bpe_tokenizer_round_trip(tmp_path):
    bpe = BpeTokenizer.train(["def f(x):\n    return x * 2\n"] * 10, vocab_size=280)
    ckpt.save_spec(tmp_path, SPEC, bpe)
    assert (tmp_path / "tokenizer.json").exists()
    spec, tok = ckpt.load_spec(tmp_path)
    assert spec.tokenizer == {"kind": "bpe", "path": "tokenizer.json"}
    assert tok.encode("return x") == bpe.encode("return x")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a Pathways checkpoint"):
        ckpt.load_spec(tmp_path)
    assert ckpt.read_meta(tmp_path) is None


def test_meta_round_trip(tmp_path):
    ckpt.write_meta(tmp_path, {"step": 7, "pathway": "p"})
    assert ckpt.read_meta(tmp_path) == {"step": 7, "pathway": "p"}
