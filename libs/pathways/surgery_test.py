"""Surgery on tiny pathways: identity insertion at every position, removal, frozen training."""

import jax
import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways import surgery
from pathways.data import TokenData
from pathways.executor.local import LocalExecutor
from pathways.modules.attention import AttentionConfig
from pathways.pipeline.runner import run_step
from pathways.pipeline.stage import LocalStage
from pathways.spec import SpecError
from pathways.tokenizers import ByteTokenizer
from pathways.train import FusedEngine, LocalTrainer, PipelineEngine, TrainConfig, make_optimizer

SPEC = spec_lib.from_dict(
    {
        "modules": {
            "embed": {"kind": "embedding", "vocab_size": 37, "d_model": 24, "max_seq_len": 16},
            "a0": {
                "kind": "attention",
                "d_model": 24,
                "n_layers": 2,
                "n_heads": 3,
                "max_seq_len": 16,
            },
            "a1": {
                "kind": "attention",
                "d_model": 24,
                "n_layers": 1,
                "n_heads": 2,
                "max_seq_len": 16,
                "n_kv_heads": 1,
                "norm": "rmsnorm",
                "mlp": "swiglu",
                "positions": "rope",
            },
            "head": {"kind": "decoding", "d_model": 24, "vocab_size": 37},
        },
        "pathways": {"p": ["embed", "a0", "a1", "head"], "short": ["embed", "a0", "head"]},
    }
)
TOKENS = np.random.default_rng(0).integers(0, 37, (3, 11)).astype(np.int32)


def _states(ex, names):
    return {n: ex.state(n) for n in names}


def _equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


NARROW = AttentionConfig(d_model=24, n_layers=2, n_heads=4, max_seq_len=16, mlp="swiglu", d_ff=13)


@pytest.mark.parametrize("position,cfg", [(1, None), (2, NARROW), (3, None)])
def test_inserted_module_leaves_the_logits_unchanged(position, cfg):
    ex = LocalExecutor(SPEC, seed=1)
    before = ex.forward("p", TOKENS)
    spec2, state = surgery.insert_attention(SPEC, "p", "new", position, cfg, seed=5)
    assert spec2.pathway("p").modules[position] == "new"
    assert spec2.modules["new"].zero_init_output
    assert list(spec2.modules)[:4] == list(SPEC.modules)  # existing seeds do not shift
    ex2 = LocalExecutor(spec2, states={**_states(ex, SPEC.modules), "new": state})
    after = ex2.forward("p", TOKENS)
    assert np.abs(after - before).max() <= 1e-6
    assert spec2.pathway("short").modules == SPEC.pathway("short").modules


def test_insert_and_remove_refuse_bad_requests_by_name():
    with pytest.raises(SpecError, match="insert position must be between 1 .* and 3 .*got 0"):
        surgery.insert_attention(SPEC, "p", "new", 0)
    with pytest.raises(SpecError, match="insert position must be between 1 .* got 4"):
        surgery.insert_attention(SPEC, "p", "new", 4)
    with pytest.raises(SpecError, match="module 'a0' already exists"):
        surgery.insert_attention(SPEC, "p", "a0", 1)
    with pytest.raises(SpecError, match="d_model mismatch"):
        surgery.insert_attention(
            SPEC, "p", "new", 1, AttentionConfig(d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
        )
    with pytest.raises(
        SpecError, match="only hidden -> hidden modules can be removed; 'head' is decoding"
    ):
        surgery.remove_module(SPEC, "p", "head")
    with pytest.raises(SpecError, match="pathway 'short' has no module 'a1'"):
        surgery.remove_module(SPEC, "short", "a1")


def test_remove_keeps_or_drops_the_module_and_runs():
    spec2 = surgery.remove_module(SPEC, "p", "a1")
    assert spec2.pathway("p").modules == ("embed", "a0", "head") and "a1" in spec2.modules
    assert "a1" not in surgery.remove_module(SPEC, "p", "a1", drop_unused=True).modules
    # a0 is still used by "short": it stays in the table even with drop_unused.
    assert "a0" in surgery.remove_module(SPEC, "p", "a0", drop_unused=True).modules
    ex = LocalExecutor(SPEC, seed=1)
    ex2 = LocalExecutor(spec2, states=_states(ex, SPEC.modules))
    np.testing.assert_array_equal(ex2.forward("p", TOKENS), ex.forward("short", TOKENS))


def _batch(step):
    toks = np.random.default_rng(step).integers(0, 37, (8, 13)).astype(np.int32)
    return toks[:, :-1], toks[:, 1:]


@pytest.mark.parametrize("engine", ["fused", "pipeline"])
def test_only_the_trainable_module_moves(engine, tmp_path):
    spec2, state = surgery.insert_attention(SPEC, "p", "new", 2, seed=3)
    # Copies: the fused step donates its input buffers.
    base = LocalExecutor(spec2, seed=1, states={"new": jax.tree.map(np.array, state)})
    ex = LocalExecutor(spec2, seed=1, states={"new": state})
    cfg = TrainConfig(
        steps=4,
        batch_size=8,
        seq_len=12,
        warmup=1,
        lr=1e-2,
        eval_every=4,
        eval_batches=1,
        save_every=4,
    )
    data = TokenData(
        train=np.tile(np.arange(37, dtype=np.int32), 20), eval=np.arange(37, dtype=np.int32)
    )
    trainer = LocalTrainer(
        ex, "p", cfg, data, tmp_path, ByteTokenizer(), engine=engine, n_micro=2, trainable={"new"}
    )
    trainer.run()
    for name in ("embed", "a0", "a1", "head"):
        assert _equal(ex.state(name), base.state(name)), name
    assert not _equal(ex.state("new"), base.state("new"))


def test_frozen_pipeline_updates_equal_the_fused_updates():
    spec2, state = surgery.insert_attention(SPEC, "p", "new", 2, seed=3)
    cfg = TrainConfig(steps=10, warmup=1, lr=1e-2)
    fused_ex = LocalExecutor(spec2, seed=1, states={"new": jax.tree.map(np.array, state)})
    pipe_ex = LocalExecutor(spec2, seed=1, states={"new": state})
    fused = FusedEngine(fused_ex, "p", make_optimizer(cfg), trainable={"new", "head"})
    stages = [LocalStage(rt, make_optimizer(cfg)) for rt in pipe_ex.chain("p")]
    PipelineEngine(stages, 4, trainable={"new", "head"})
    assert [(s.frozen, s.input_grad) for s in stages] == [
        (True, False),
        (True, False),
        (False, False),
        (True, True),
        (False, True),
    ]
    for step in range(3):
        inputs, targets = _batch(step)
        fused.step(inputs, targets)
        run_step(stages, inputs, targets, 4, "1f1b")
    for name in ("new", "head"):
        a, b = jax.tree.leaves(pipe_ex.state(name)), jax.tree.leaves(fused_ex.state(name))
        scale = max(float(np.abs(np.asarray(y)).max()) for y in b)
        diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b))
        assert diff / scale <= 1e-5, name


def test_trainable_names_are_checked():
    ex = LocalExecutor(SPEC)
    with pytest.raises(ValueError, match=r"trainable module\(s\) nope not in the pathway"):
        FusedEngine(ex, "p", make_optimizer(TrainConfig()), trainable={"nope"})
