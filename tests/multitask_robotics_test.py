"""examples/multitask.yaml: the robotics pathways go through the same attention modules as
text, vision and speech; behaviour cloning through them lowers each robotics loss and moves the
shared modules, and the text pathway still reads them (its loss is measured, not bounded)."""

from pathlib import Path

import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.datasets.robotics import demonstrations
from pathways.executor.local import LocalExecutor
from pathways.tokenizers import ByteTokenizer
from pathways.train import LocalTrainer, TrainConfig

SPEC = Path(__file__).resolve().parents[1] / "examples/multitask.yaml"


# Continuous targets (torques) need more steps than discrete ones to move the loss clearly.
@pytest.mark.parametrize("pathway, steps, lr", [("doorkey", 40, 3e-3), ("reacher", 150, 3e-3)])
def test_robotics_pathways_learn_through_the_shared_modules(
    tmp_path, monkeypatch, pathway, steps, lr
):
    monkeypatch.setenv("PATHWAYS_CACHE_DIR", str(tmp_path / "cache"))
    spec = spec_lib.load(SPEC)
    p = spec.pathway(pathway)
    assert p.causal and p.max_seq_len == 16
    assert set(p.modules) & set(spec.pathway("text").modules) == {"shared-0", "shared-1"}
    data = demonstrations(pathway, episodes=4, eval_episodes=1, noise=0.1)
    data.check_pathway(spec, pathway)
    ex = LocalExecutor(spec)
    x, y = data.batch(0, 32, 16, seed=0)
    before = ex.loss(pathway, x, y)
    start = np.asarray(ex.state("shared-0").blocks[0].q.kernel[...]).copy()
    cfg = TrainConfig(steps=steps, batch_size=16, seq_len=16, lr=lr, warmup=2, eval_every=steps)
    LocalTrainer(ex, pathway, cfg, data, tmp_path / pathway, ByteTokenizer()).run()
    after = ex.loss(pathway, x, y)
    assert after < (0.7 if pathway == "doorkey" else 0.8) * before, (before, after)
    assert np.abs(np.asarray(ex.state("shared-0").blocks[0].q.kernel[...]) - start).max() > 1e-4
    tokens = np.frombuffer(b"the quick brown fox jumps over the lazy dog", np.uint8)
    text = np.asarray(tokens, np.int32)[None]
    assert np.isfinite(ex.loss("text", text[:, :-1], text[:, 1:]))
