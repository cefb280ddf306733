"""Tests for the demonstration data sets: deterministic, cached, windows of the last K steps,
expert targets under noise, padding, pathway checks."""

import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.datasets import robotics as demos
from pathways.robotics.experts import grid_expert, reacher_expert


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHWAYS_CACHE_DIR", str(tmp_path))
    demos.demonstrations.cache_clear()


def test_generation_is_deterministic_and_cached_on_disk(tmp_path):
    d = demos.demonstrations("doorkey", episodes=6, eval_episodes=2, noise=0.2, seed=3)
    files = list((tmp_path / "demonstrations").glob("doorkey-*.npz"))
    assert len(files) == 1
    assert d.episodes("train") == 6 and d.episodes("eval") == 2
    assert d.obs["train"].shape == (d.steps("train"), 192) and d.obs["train"].dtype == np.float32
    assert d.actions["train"].dtype == np.int32
    again = demos.demonstrations.__wrapped__("doorkey", 6, 2, 0.2, 3, cache=False)  # afresh
    for split in ("train", "eval"):
        np.testing.assert_array_equal(again.obs[split], d.obs[split])
        np.testing.assert_array_equal(again.actions[split], d.actions[split])
        np.testing.assert_array_equal(again.starts[split], d.starts[split])
    # A second process reads the cache file instead of generating: mark it and see the mark.
    with np.load(files[0]) as f:
        parts = {k: f[k] for k in f.files}
    parts["train_actions"] = np.full_like(parts["train_actions"], 6)
    np.savez(files[0], **parts)
    demos.demonstrations.cache_clear()
    marked = demos.demonstrations("doorkey", episodes=6, eval_episodes=2, noise=0.2, seed=3)
    assert (marked.actions["train"] == 6).all()
    other = demos.demonstrations("doorkey", episodes=6, eval_episodes=2, noise=0.2, seed=4)
    assert len(list((tmp_path / "demonstrations").glob("doorkey-*.npz"))) == 2
    assert not (other.actions["train"] == 6).all()


def test_noisy_demonstrations_keep_the_experts_targets():
    d = demos.demonstrations("doorkey", episodes=8, eval_episodes=1, noise=0.3, seed=1)
    obs, acts, starts = d.obs["train"], d.actions["train"], d.starts["train"]
    want = [grid_expert(o.reshape(8, 8, 3).astype(np.int64)) for o in obs]
    np.testing.assert_array_equal(acts, want)
    clean = demos.demonstrations("doorkey", episodes=8, eval_episodes=1, noise=0.0, seed=1)
    # Noise took other actions somewhere, so the episodes differ (and last longer in total).
    assert d.steps() > clean.steps()
    assert np.diff(starts).min() >= 1
    r = demos.demonstrations("reacher", episodes=2, eval_episodes=1, noise=0.5)
    assert r.actions["train"].shape == (100, 2) and r.actions["train"].dtype == np.float32
    np.testing.assert_allclose(r.actions["train"][7], reacher_expert(r.obs["train"][7]))


def test_windows_are_the_last_k_steps_from_each_start():
    d = demos.Demonstrations(
        "doorkey",
        obs={"train": np.arange(9, dtype=np.float32)[:, None].repeat(192, 1)},
        actions={"train": np.arange(9, dtype=np.int32)},
        starts={"train": np.array([0, 2, 9])},  # episodes of 2 and 7 steps
    )
    wins = d.windows("train", 4)
    # Episode 0 is shorter than k: one padded window; episode 1: starts 2..5, 4 steps each.
    np.testing.assert_array_equal(wins, [[0, 2], [2, 4], [3, 4], [4, 4], [5, 4]])
    x, y = d.gather("train", wins[[0, 3]], 4)
    np.testing.assert_array_equal(y, [[0, 1, -1, -1], [4, 5, 6, 7]])
    np.testing.assert_array_equal(x[0, :, 0], [0, 1, 0, 0])  # padding observations are zero
    with pytest.raises(ValueError, match="at least one step; got 0"):
        d.windows("train", 0)


def test_batches_are_a_pure_function_of_seed_and_step_and_cover_every_window():
    d = demos.demonstrations("reacher", episodes=3, eval_episodes=1, noise=0.1)
    n = len(d.windows("train", 16))  # 3 x (50 - 16 + 1)
    assert n == 105
    x, y = d.batch(2, 7, 16, seed=5)
    x2, y2 = d.batch(2, 7, 16, seed=5)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert x.shape == (7, 16, 10) and y.shape == (7, 16, 2) and not np.isnan(y).any()
    assert not np.array_equal(x, d.batch(2, 7, 16, seed=6)[0])
    seen = np.concatenate([d.batch(s, 5, 16, seed=1)[0][:, 0] for s in range(n // 5)])
    assert len(np.unique(seen, axis=0)) == n  # one epoch: every window's first step once
    ex, ey = d.batch(0, 40, 16, seed=0, split="eval")
    assert ex.shape == (40, 16, 10) and not np.isnan(ey).any()


def test_pathway_checks_name_module_and_values():
    spec = spec_lib.from_dict(
        {
            "modules": {
                "arm": {
                    "kind": "observation_embedding",
                    "observation": "vector",
                    "obs_dim": 10,
                    "d_model": 8,
                    "max_seq_len": 4,
                },
                "grid": {
                    "kind": "observation_embedding",
                    "observation": "grid",
                    "obs_dim": 192,
                    "grid_rows": 8,
                    "grid_columns": 8,
                    "d_model": 8,
                    "max_seq_len": 4,
                },
                "attn": {
                    "kind": "attention",
                    "d_model": 8,
                    "n_layers": 1,
                    "n_heads": 2,
                    "max_seq_len": 4,
                },
                "torques": {"kind": "action", "d_model": 8, "space": "continuous", "actions": 2},
                "moves": {"kind": "action", "d_model": 8, "space": "discrete", "actions": 7},
                "two": {"kind": "action", "d_model": 8, "space": "discrete", "actions": 2},
            },
            "pathways": {
                "reacher": ["arm", "attn", "torques"],
                "doorkey": ["grid", "attn", "moves"],
                "wrong": ["grid", "attn", "two"],
            },
        }
    )
    d = demos.demonstrations("doorkey", episodes=1, eval_episodes=1)
    d.check_pathway(spec, "doorkey")
    with pytest.raises(ValueError, match=r"'arm' .* size 10 but doorkey observations are 192"):
        d.check_pathway(spec, "reacher")
    with pytest.raises(ValueError, match=r"'two' .* size 2 \(space discrete\) .* 7 discrete"):
        d.check_pathway(spec, "wrong")
    with pytest.raises(ValueError, match="unknown environment 'pong'"):
        demos.demonstrations("pong")
