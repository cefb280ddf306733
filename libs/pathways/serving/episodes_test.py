"""The gateway's episode table over an in-process executor: steps equal the policy's, idle
episodes expire (then NOT_FOUND), the table has a capacity (RESOURCE_EXHAUSTED), ending is
idempotent."""

import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.robotics.policy import Policy
from pathways.serving.episodes import Episodes, TooManyEpisodes, UnknownEpisode

SPEC = spec_lib.from_dict(
    {
        "modules": {
            "arm": {
                "kind": "observation_embedding",
                "observation": "vector",
                "obs_dim": 5,
                "d_model": 12,
                "max_seq_len": 3,
            },
            "attn": {
                "kind": "attention",
                "d_model": 12,
                "n_layers": 1,
                "n_heads": 3,
                "max_seq_len": 3,
            },
            "moves": {"kind": "action", "d_model": 12, "space": "discrete", "actions": 3},
        },
        "pathways": {"arm": ["arm", "attn", "moves"]},
    }
)


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_steps_equal_the_policy_and_idle_episodes_expire():
    ex, clock = LocalExecutor(SPEC, seed=1), Clock()
    table = Episodes(ex, ttl_s=10, capacity=2, clock=clock)
    a, b = table.start("arm"), table.start("arm")
    assert a != b and len(table) == 2
    with pytest.raises(TooManyEpisodes, match="2 episodes are running"):
        table.start("arm")
    policy = Policy(ex, "arm")
    rng = np.random.default_rng(0)
    for i in range(5):  # past the window of 3
        obs = rng.normal(size=5).astype(np.float32)
        out, discrete, steps = table.step(a, obs)
        assert discrete and steps == i + 1
        np.testing.assert_allclose(out, policy.outputs(obs), atol=1e-6)
        clock.t += 6  # a steps every 6 s; b never
    assert table.pathway(a) == "arm"
    with pytest.raises(UnknownEpisode, match="idle longer than the gateway's session TTL of 10 s"):
        table.step(b, np.zeros(5, np.float32))
    assert table.end(a) and not table.end(a) and len(table) == 0
    with pytest.raises(ValueError, match="unknown pathway 'nope'"):
        Episodes(ex).start("nope")


def test_a_failed_step_leaves_the_episode_as_it_was():
    """A step that fails (a remote error after every retry) does not join the episode: the
    caller may send the observation again and gets what an unbroken episode gives."""
    ex = LocalExecutor(SPEC, seed=2)
    table, policy = Episodes(ex), Policy(ex, "arm")
    key = table.start("arm")
    obs = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    for i, o in enumerate(obs):
        if i in (1, 4):  # a decode step, then a re-prefill of the full window
            session = table._episodes[key].policy._session
            real = {"decode": session.decode, "prefill": session.prefill}

            def fail(*a, **k):
                raise RuntimeError("replica lost")

            session.decode = session.prefill = fail
            with pytest.raises(RuntimeError):
                table.step(key, o)
            session.decode, session.prefill = real["decode"], real["prefill"]
        out, _, steps = table.step(key, o)
        assert steps == i + 1
        np.testing.assert_allclose(out, policy.outputs(o), atol=1e-6)
