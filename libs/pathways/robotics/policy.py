"""Acting in this process: a pathway from observations to actions as a policy whose running
episode is a session, and rollouts of it in the simulated tasks.

A control step is a decode step: the new observation goes through the pathway at the next
position, attending to the episode's earlier steps in the attention modules' KV caches. The
policy sees the last K steps (K <= the pathway's max_seq_len), as in training
(`pathways.datasets.robotics`): once K steps are in the cache, every step re-prefills the window
of the last K observations at positions 0..K-1 (learned positions are absolute, so cached keys
cannot slide).
"""

from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np

from pathways.executor.base import bucket
from pathways.executor.local import LocalExecutor
from pathways.robotics.envs import Env, Episode


class Policy:
    """One episode at a time on `pathway` (observations in, an `action` head out) over the
    executor's module engines: the session holds one KV-cache slot in each attention engine.

    `act(obs)` takes one observation (obs_dim floats) and returns one action (an int, or a
    float32 vector in [-1, 1]); `reset()` starts a new episode (a new session).
    """

    def __init__(self, executor: LocalExecutor, pathway: str, window: int | None = None):
        spec = executor.spec
        p = spec.pathway(pathway)
        first, last = spec.modules[p.modules[0]], spec.modules[p.modules[-1]]
        if first.input_contract[0] != "observation" or last.output_contract[0] != "actions":
            raise ValueError(
                f"pathway {pathway!r} reads {first.input_contract[0]} and outputs "
                f"{last.output_contract[0]}: a policy needs observations in and actions out"
            )
        if not p.causal:
            raise ValueError(
                f"pathway {pathway!r} is bidirectional: a policy's step may only see the steps "
                "before it (declare mask: causal)"
            )
        self.k = p.max_seq_len if window is None else window
        if not 1 <= self.k <= p.max_seq_len:
            raise ValueError(
                f"window must be in [1, {p.max_seq_len}] (pathway {pathway!r} max_seq_len); "
                f"got {self.k}"
            )
        self.executor, self.pathway = executor, pathway
        self.engines = [executor.engines[m] for m in p.modules]
        self.obs_dim = first.input_contract[1]
        self.discrete = getattr(last, "space", "discrete") == "discrete"
        self.max_seq_len = p.max_seq_len
        self._slots: dict[str, np.ndarray] | None = None
        self._history: collections.deque = collections.deque(maxlen=self.k)

    def reset(self) -> None:
        """Ends the current episode's session and opens a new one."""
        self.close()
        with self.executor._lock:
            self._slots = {e.name: e.take(1) for e in self.engines if e.kind.has_cache}
        self._history.clear()

    def close(self) -> None:
        if self._slots is not None:
            with self.executor._lock:
                for e in self.engines:
                    if e.name in self._slots:
                        e.give(self._slots[e.name])
            self._slots = None

    def check(self, obs) -> np.ndarray:
        """One observation as float32 (obs_dim,), else ValueError naming shape/dtype/values."""
        x = np.asarray(obs)
        if x.dtype.kind not in "fiu":
            raise ValueError(f"observation must be numbers; got dtype {x.dtype}")
        if x.shape != (self.obs_dim,):
            raise ValueError(
                f"observation must have shape ({self.obs_dim},) for pathway {self.pathway!r}; "
                f"got {x.shape}"
            )
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError("observation has NaN or infinite values")
        return x

    def outputs(self, obs) -> np.ndarray:
        """The head's output for this step (action scores or the continuous mean), (A,), with
        the observation appended to the episode."""
        x = self.check(obs)
        if self._slots is None:
            self.reset()
        n = len(self._history)
        self._history.append(x)
        if n < self.k:  # a decode step at the next position
            xs, positions = x[None, None], np.array([[n]], np.int32)
        else:  # the window is full: re-prefill the last k steps at positions 0..k-1
            xs = np.stack(self._history)[None]
            positions = np.arange(self.k, dtype=np.int32)[None]
        window = bucket(int(positions.max()) + 1, self.max_seq_len)
        with self.executor._lock:
            for e in self.engines:
                xs = e.step(xs, positions, self._slots.get(e.name), window=window)
        return np.asarray(xs)[0, -1]

    def act(self, obs):
        """The action for one observation: the most likely choice, or the mean in [-1, 1]."""
        out = self.outputs(obs)
        if self.discrete:
            return int(np.argmax(out))
        return np.clip(out, -1.0, 1.0).astype(np.float32)


def recompute_outputs(executor: LocalExecutor, pathway: str, episode_obs: np.ndarray, k: int):
    """The head's outputs for each step of an episode, each computed from scratch by a
    stateless forward over that step's window of the last k observations (the reference a
    cached policy must equal), (T, A)."""
    out = []
    for t in range(len(episode_obs)):
        window = episode_obs[max(0, t - k + 1) : t + 1][None]
        out.append(executor.forward(pathway, window)[0, -1])
    return np.stack(out)


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """Episodes of a policy in a task, and the time each control step took (s)."""

    env: str
    episodes: list[Episode]
    step_seconds: list[float]

    @property
    def success_rate(self) -> float:
        return float(np.mean([e.success for e in self.episodes]))

    @property
    def mean_return(self) -> float:
        return float(np.mean([e.ret for e in self.episodes]))

    @property
    def mean_final_distance(self) -> float:
        return float(np.mean([e.final_distance for e in self.episodes]))

    @property
    def mean_steps(self) -> float:
        return float(np.mean([e.steps for e in self.episodes]))

    def latency_ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.step_seconds) * 1e3, q))

    def summary(self) -> dict:
        out = {
            "env": self.env,
            "episodes": len(self.episodes),
            "success_rate": self.success_rate,
            "mean_return": self.mean_return,
            "mean_steps": self.mean_steps,
        }
        if self.env == "reacher":
            out["mean_final_distance"] = self.mean_final_distance
        if self.step_seconds:
            out["step_ms_p50"], out["step_ms_p99"] = self.latency_ms(50), self.latency_ms(99)
        return out


def rollout(env: Env | str, policy, seeds, on_step=None) -> Rollouts:
    """Runs one episode per seed with `policy` (anything with `reset()` and `act(obs)`; the
    experts: `ExpertPolicy`), timing each `act`."""
    env = Env(env) if isinstance(env, str) else env
    episodes, times = [], []
    for seed in seeds:
        obs = env.reset(int(seed))
        policy.reset()
        while not env.done:
            t0 = time.perf_counter()
            action = policy.act(obs)
            times.append(time.perf_counter() - t0)
            obs, _, _ = env.step(action)
            if on_step:
                on_step(env, action)
        episodes.append(env.episode())
    if hasattr(policy, "close"):
        policy.close()
    return Rollouts(env.info.name, episodes, times)


class ExpertPolicy:
    """The task's expert as a policy (`rollout(env, ExpertPolicy(env), seeds)`)."""

    def __init__(self, env: Env):
        self.env = env

    def reset(self) -> None:
        pass

    def act(self, obs):
        return self.env.expert()


class RandomPolicy:
    """Uniformly random actions (the baseline the targets compare with), from `seed`."""

    def __init__(self, env: Env, seed: int = 0):
        self.info, self.rng = env.info, np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def act(self, obs):
        if self.info.actions == "discrete":
            return int(self.rng.integers(self.info.action_size))
        return self.rng.uniform(-1, 1, self.info.action_size).astype(np.float32)
