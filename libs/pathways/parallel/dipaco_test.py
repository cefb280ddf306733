"""DiPaCo: the grid of paths, deterministic balanced routing, and shared modules that take only
their own paths' updates."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.parallel import diloco, dipaco
from pathways.train import TrainConfig

BASE = {
    "modules": {
        "embed": {"kind": "embedding", "vocab_size": 64, "d_model": 32, "max_seq_len": 16},
        "lower": {
            "kind": "attention",
            "d_model": 32,
            "n_layers": 1,
            "n_heads": 2,
            "max_seq_len": 16,
        },
        "upper": {
            "kind": "attention",
            "d_model": 32,
            "n_layers": 1,
            "n_heads": 2,
            "max_seq_len": 16,
        },
        "head": {"kind": "decoding", "d_model": 32, "vocab_size": 64},
    },
    "pathways": {"p": ["embed", "lower", "upper", "head"], "other": ["embed", "head"]},
}


def _grid():
    return spec_lib.from_dict(dipaco.grid(BASE, "p", {"lower": 2, "upper": 2}))


def test_grid_paths_share_the_modules_not_chosen():
    spec = _grid()
    assert list(spec.pathways) == ["p.0.0", "p.0.1", "p.1.0", "p.1.1"]
    assert spec.pathway("p.1.0").modules == ("embed", "lower.1", "upper.0", "head")
    used = dipaco.users(spec, list(spec.pathways))
    assert used["embed"] == used["head"] == list(spec.pathways)
    assert used["lower.0"] == ["p.0.0", "p.0.1"] and used["upper.1"] == ["p.0.1", "p.1.1"]
    with pytest.raises(ValueError, match="choices name 'middle'"):
        dipaco.grid(BASE, "p", {"middle": 2})
    with pytest.raises(ValueError, match=r"choices\['lower'\] must be an integer >= 1"):
        dipaco.grid(BASE, "p", {"lower": 0})


def test_routing_is_deterministic_balanced_and_finds_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float32)
    feats = np.concatenate([c + rng.normal(0, 0.5, (25, 2)) for c in centres]).astype(np.float32)
    paths = ["a", "b", "c", "d"]
    r1, r2 = dipaco.Router.fit(feats, paths, seed=3), dipaco.Router.fit(feats, paths, seed=3)
    np.testing.assert_array_equal(r1.centroids, r2.centroids)
    routed = r1.route(feats)
    for g in range(4):  # each true cluster lands on one path, a different one per cluster
        assert len(set(routed[g * 25 : (g + 1) * 25])) == 1
    assert len(set(routed)) == 4
    balanced = r1.assign_balanced(feats[:98])  # 98 documents: shares 25, 25, 24, 24
    assert sorted(np.bincount(balanced, minlength=4)) == [24, 24, 25, 25]
    again = dipaco.Router.from_dict(r1.to_dict())
    np.testing.assert_array_equal(again.route(feats), routed)


def test_each_shared_module_takes_only_its_paths_updates():
    """H=1, inner SGD, outer plain averaging (lr 1, no momentum): a module's new parameters are
    its old ones minus lr x the mean gradient of the paths that use it, on their own batches."""
    spec = _grid()
    paths = list(spec.pathways)
    ex = LocalExecutor(spec, seed=1)
    start = {m: ex.state(m) for m in spec.modules}
    rng = np.random.default_rng(0)
    tokens = {p: rng.integers(0, 64, 400).astype(np.int32) for p in paths}
    train = TrainConfig(steps=1, batch_size=2, seq_len=8, lr=0.1, warmup=0, clip=0.0, seed=0)
    cfg = diloco.DiLoCoConfig(
        workers=len(paths), inner_steps=1, inner="sgd", outer_lr=1.0, outer_momentum=0.0
    )
    history = dipaco.simulate(ex, paths, train, cfg, tokens, rounds=1)
    assert set(history[0]["losses"]) == set(paths)

    ref = LocalExecutor(spec, {m: start[m] for m in spec.modules})
    grads = {}
    for i, p in enumerate(paths):
        x, y = diloco.shard_batch(tokens[p], i, 0, 2, 8, 0)
        grads[p] = ref.loss_and_grads(p, x, y)[1]
    for m, using in dipaco.users(spec, paths).items():
        want = jax.tree.map(
            lambda s, *g: s - 0.1 * sum(g) / len(g), start[m], *[grads[p][m] for p in using]
        )
        for got, w in zip(jax.tree.leaves(ex.state(m)), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=1e-4, atol=1e-6)
    # lower.0 moved only by paths p.0.x: p.1.x's gradients would have moved it elsewhere.
    moved = [
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(ex.state("lower.0")), jax.tree.leaves(start["lower.0"]))
    ]
    assert max(moved) > 0
