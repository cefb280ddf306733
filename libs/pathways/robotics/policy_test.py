"""A policy's cached control steps equal recomputing its window from scratch, in both tasks'
observation kinds and across the window's slide; the spec and the policy refuse what cannot act."""

import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.robotics.envs import Env
from pathways.robotics.policy import (
    ExpertPolicy,
    Policy,
    RandomPolicy,
    recompute_outputs,
    rollout,
)

# Tiny and odd: width 12, 3 heads, a 5-step context; DoorKey's grid in the agent's frame.
MODULES = {
    "grid": {
        "kind": "observation_embedding",
        "observation": "grid",
        "obs_dim": 192,
        "grid_rows": 8,
        "grid_columns": 8,
        "frame": "agent",
        "view": 7,
        "cell_dim": 5,
        "conv_channels": 3,
        "conv_layers": 1,
        "d_model": 12,
        "max_seq_len": 5,
        "init_std": 0.3,
    },
    "arm": {
        "kind": "observation_embedding",
        "observation": "vector",
        "obs_dim": 10,
        "hidden": 13,
        "d_model": 12,
        "max_seq_len": 5,
        "init_std": 0.3,
    },
    "attn": {"kind": "attention", "d_model": 12, "n_layers": 2, "n_heads": 3, "max_seq_len": 7},
    "moves": {"kind": "action", "d_model": 12, "space": "discrete", "actions": 7, "init_std": 0.3},
    "torques": {
        "kind": "action",
        "d_model": 12,
        "space": "continuous",
        "actions": 2,
        "squash": "tanh",
        "init_std": 0.3,
    },
    "embed": {"kind": "embedding", "vocab_size": 11, "d_model": 12, "max_seq_len": 8},
}
SPEC = spec_lib.from_dict(
    {
        "modules": MODULES,
        "pathways": {
            "doorkey": ["grid", "attn", "moves"],
            "reacher": ["arm", "attn", "torques"],
            "seeing": {"modules": ["arm", "attn", "torques"], "mask": "bidirectional"},
        },
    }
)


def test_observation_pathways_are_causal_and_bounded_by_their_window():
    p = SPEC.pathway("doorkey")
    assert p.causal and p.max_seq_len == 5  # the embedding's positions bound it, not attn's 7
    assert not SPEC.pathway("seeing").causal


@pytest.mark.parametrize(
    "pathways, match",
    [
        (
            ["embed", "attn", "moves"],
            r"'moves' \(action\) outputs actions but 'embed' "
            r"\(embedding\) reads tokens, not observations",
        ),
        (["grid", "moves"], r"d_model mismatch|outputs hidden"),
    ],
)
def test_spec_rejects_a_mismatched_pathway_naming_modules(pathways, match):
    mods = dict(MODULES)
    if pathways == ["grid", "moves"]:
        mods["moves"] = {**MODULES["moves"], "d_model": 16}
        match = r"d_model mismatch: 'grid' outputs 12 but 'moves' expects 16"
    with pytest.raises(spec_lib.SpecError, match=match):
        spec_lib.from_dict({"modules": mods, "pathways": {"p": pathways}})


def test_spec_rejects_a_grid_that_does_not_match_its_size():
    bad = {**MODULES["grid"], "obs_dim": 100}
    with pytest.raises(spec_lib.SpecError, match=r"module 'grid': obs_dim \(100\) must be"):
        spec_lib.from_dict({"modules": {"grid": bad}, "pathways": {"p": ["grid"]}})


def _episode(env_name, pathway, window, steps, seed=0):
    """Acts `steps` control steps (or to the episode's end) with a fresh policy; returns the
    observations it saw and the outputs it computed."""
    ex = LocalExecutor(SPEC, seed=4)
    policy = Policy(ex, pathway, window=window)
    env = Env(env_name)
    obs = env.reset(seed)
    seen, outs, actions = [], [], []
    for _ in range(steps):
        seen.append(obs)
        out = policy.outputs(obs)
        outs.append(out)
        action = int(np.argmax(out)) if policy.discrete else np.clip(out, -1, 1)
        actions.append(action)
        obs, _, done = env.step(action)
        if done:
            break
    policy.close()
    return ex, np.stack(seen), np.stack(outs), actions


@pytest.mark.parametrize(
    "env_name, pathway, window",
    [("doorkey", "doorkey", 5), ("doorkey", "doorkey", 3), ("reacher", "reacher", 5)],
)
def test_cached_steps_equal_recomputing_the_window(env_name, pathway, window):
    ex, seen, outs, _ = _episode(env_name, pathway, window, steps=12)
    assert len(seen) == 12  # long enough to slide the window several times
    want = recompute_outputs(ex, pathway, seen, window)
    np.testing.assert_allclose(outs, want, rtol=1e-4, atol=1e-5)
    # The context matters: a policy that saw only the current step computes something else.
    alone = recompute_outputs(ex, pathway, seen, 1)
    assert np.abs(alone[1:] - outs[1:]).max() > 1e-4


def test_sessions_are_independent_and_reset_starts_a_new_episode():
    ex = LocalExecutor(SPEC, seed=4)
    env = Env("reacher")
    a, b = Policy(ex, "reacher"), Policy(ex, "reacher")
    first = env.reset(1)
    out_a = [a.outputs(first)]
    b.outputs(env.reset(2))  # another episode in between, on other cache slots
    obs, _, _ = env.step(np.zeros(2, np.float32))
    out_a.append(a.outputs(obs))
    np.testing.assert_allclose(
        np.stack(out_a), recompute_outputs(ex, "reacher", np.stack([first, obs]), 5), atol=1e-5
    )
    a.reset()
    np.testing.assert_allclose(
        a.outputs(obs), ex.forward("reacher", obs[None, None])[0, 0], atol=1e-5
    )
    a.close(), b.close()


def test_policy_refuses_bad_observations_and_pathways():
    ex = LocalExecutor(SPEC, seed=4)
    policy = Policy(ex, "reacher")
    with pytest.raises(ValueError, match=r"shape \(10,\) for pathway 'reacher'; got \(9,\)"):
        policy.act(np.zeros(9, np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        policy.act(np.full(10, np.nan, np.float32))
    with pytest.raises(ValueError, match="must be numbers; got dtype <U1"):
        policy.act(np.array(list("abcdefghij")))
    with pytest.raises(ValueError, match="'seeing' is bidirectional"):
        Policy(ex, "seeing")
    with pytest.raises(ValueError, match=r"window must be in \[1, 5\]"):
        Policy(ex, "reacher", window=6)


def test_rollout_reports_episodes_of_experts_and_policies():
    env = Env("doorkey")
    expert = rollout(env, ExpertPolicy(env), [0, 1])
    assert expert.success_rate == 1.0 and expert.mean_return > 0.9
    assert len(expert.step_seconds) == sum(e.steps for e in expert.episodes)
    reacher = Env("reacher")
    rand = rollout(reacher, RandomPolicy(reacher), [0, 1]).summary()
    assert rand["episodes"] == 2 and rand["mean_final_distance"] > 0.02
    ex = LocalExecutor(SPEC, seed=4)
    learned = rollout(reacher, Policy(ex, "reacher"), [0]).summary()
    assert learned["mean_steps"] == 50 and learned["step_ms_p99"] > 0
