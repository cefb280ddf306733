"""Behaviour cloning trains through the same Trainer and engines as text and vision (inputs are
observation windows, targets the expert's actions): a few steps lower the loss, fused and
pipelined alike, for discrete and continuous actions."""

import jax
import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.datasets.robotics import demonstrations
from pathways.executor.local import LocalExecutor
from pathways.tokenizers import ByteTokenizer
from pathways.train import LocalTrainer, TrainConfig

# Tiny and odd: width 12, 3 heads, a window of 6 steps; one attention module for both tasks.
SPEC = spec_lib.from_dict(
    {
        "modules": {
            "grid": {
                "kind": "observation_embedding",
                "observation": "grid",
                "obs_dim": 192,
                "grid_rows": 8,
                "grid_columns": 8,
                "frame": "agent",
                "view": 9,
                "cell_dim": 5,
                "conv_channels": 3,
                "conv_layers": 1,
                "d_model": 12,
                "max_seq_len": 6,
            },
            "arm": {
                "kind": "observation_embedding",
                "observation": "vector",
                "obs_dim": 10,
                "hidden": 13,
                "scale": [1, 1, 1, 1, 5, 5, 0.1, 0.1, 20, 20],
                "d_model": 12,
                "max_seq_len": 6,
            },
            "attn": {
                "kind": "attention",
                "d_model": 12,
                "n_layers": 1,
                "n_heads": 3,
                "max_seq_len": 6,
            },
            "moves": {"kind": "action", "d_model": 12, "space": "discrete", "actions": 7},
            "torques": {
                "kind": "action",
                "d_model": 12,
                "space": "continuous",
                "actions": 2,
                "squash": "tanh",
            },
        },
        "pathways": {"doorkey": ["grid", "attn", "moves"], "reacher": ["arm", "attn", "torques"]},
    }
)
# Continuous targets (torques) need more steps than discrete ones to move the loss clearly.
CFGS = {
    "doorkey": TrainConfig(steps=25, batch_size=8, seq_len=6, lr=1e-2, warmup=2, eval_every=25),
    "reacher": TrainConfig(steps=80, batch_size=16, seq_len=6, lr=1e-2, warmup=2, eval_every=80),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATHWAYS_CACHE_DIR", str(cache))
        return {
            "doorkey": demonstrations("doorkey", episodes=6, eval_episodes=2, noise=0.1),
            "reacher": demonstrations("reacher", episodes=2, eval_episodes=1, noise=0.1),
        }


def _train(tmp_path, data, pathway, engine):
    ex = LocalExecutor(SPEC, seed=3)
    data[pathway].check_pathway(SPEC, pathway)
    trainer = LocalTrainer(
        ex, pathway, CFGS[pathway], data[pathway], tmp_path / engine, ByteTokenizer(), engine=engine
    )
    return ex, trainer.run()


@pytest.mark.parametrize("pathway", ["doorkey", "reacher"])
def test_a_few_steps_lower_the_loss_fused_and_pipelined_alike(tmp_path, data, pathway):
    cfg, d = CFGS[pathway], data[pathway]
    x, y = d.batch(0, 64, cfg.seq_len, seed=cfg.seed)  # a fixed set of training windows
    before = LocalExecutor(SPEC, seed=3).loss(pathway, x, y)
    fused_ex, fused = _train(tmp_path, data, pathway, "fused")
    pipe_ex, piped = _train(tmp_path, data, pathway, "pipeline")
    after = fused_ex.loss(pathway, x, y)
    if pathway == "doorkey":
        assert before == pytest.approx(np.log(7), rel=0.1)  # seven actions, untrained
        assert after < before - 0.5
    else:
        assert after < 0.7 * before
    np.testing.assert_allclose([r["loss"] for r in piped], [r["loss"] for r in fused], rtol=1e-4)
    for name in SPEC.pathway(pathway).modules:
        a, b = jax.tree.leaves(pipe_ex.state(name)), jax.tree.leaves(fused_ex.state(name))
        scale = max(float(np.abs(np.asarray(y)).max()) for y in b)
        diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b))
        assert diff <= 1e-3 * scale, name
    # The executor's loss is the trainer's eval loss (same windows, same causal mask).
    evals = [
        d.batch(i, cfg.batch_size, cfg.seq_len, cfg.seed, split="eval")
        for i in range(cfg.eval_batches)
    ]
    loss = np.mean([fused_ex.loss(pathway, x, y) for x, y in evals])
    assert loss == pytest.approx(fused[-1]["eval_loss"], rel=1e-5)
