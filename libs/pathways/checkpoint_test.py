"""Tests for checkpoints: per-module parameter round trips, spec + tokenizer, training metadata."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from pathways import checkpoint as ckpt
from pathways import modules as mod
from pathways import spec as spec_lib
from pathways.modules.adapter import AdapterConfig
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


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Every kind's module as configured in the small example specs, and the adapter (in none).
KIND_CONFIGS = {
    f"{f}/{name}": cfg
    for f in ("tiny", "digits", "speech", "robotics")
    for name, cfg in spec_lib.load(EXAMPLES / f"{f}.yaml").modules.items()
} | {"adapter": AdapterConfig(d_model=24, bottleneck=7)}


def test_example_configs_cover_every_builtin_kind():
    builtin = {
        n
        for n in mod.registry.names()
        if mod.registry.get(n).config.__module__.startswith("pathways.")
    }
    assert {cfg.kind for cfg in KIND_CONFIGS.values()} == builtin


@pytest.mark.parametrize("where", sorted(KIND_CONFIGS))
def test_restore_module_reads_the_checkpoint_into_abstract_shapes(tmp_path, where):
    cfg = KIND_CONFIGS[where]
    built = mod.build(cfg, seed=3)
    ckpt.save_module(tmp_path, "m", nnx.state(built))
    shapes = nnx.state(mod.abstract(cfg))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    state = ckpt.restore_module(tmp_path, "m", cfg)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    assert jax.tree.structure(state) == jax.tree.structure(nnx.state(built))
    assert _equal(state, nnx.state(built))
    assert [x.dtype for x in jax.tree.leaves(state)] == [
        x.dtype for x in jax.tree.leaves(nnx.state(built))
    ]
    module = mod.from_state(cfg, state)
    assert nnx.graphdef(module) == nnx.graphdef(built)
    assert _equal(nnx.state(module), nnx.state(built))


def test_restore_module_refuses_another_configs_tree(tmp_path):
    small = mod.EmbeddingConfig(vocab_size=37, d_model=24, max_seq_len=16)
    ckpt.save_module(tmp_path, "embed", nnx.state(mod.build(small)))
    wider = mod.EmbeddingConfig(vocab_size=37, d_model=32, max_seq_len=16)
    with pytest.raises(ValueError, match="module 'embed'"):
        ckpt.restore_module(tmp_path, "embed", wider)
    with pytest.raises(FileNotFoundError, match="modules/other does not exist"):
        ckpt.restore_module(tmp_path, "other", small)


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
