"""Acting: a pathway from observations to actions as a policy whose running episode is a
session (in this process, or on module servers), and rollouts of it in the simulated tasks.

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
from pathways.modules.action import choose
from pathways.robotics.envs import Env, Episode


class Policy:
    """One episode at a time on `pathway` (observations in, an `action` head out): in this
    process over a `LocalExecutor`'s module engines (the session holds one KV-cache slot in each
    attention engine), or over a `RemoteExecutor`'s module servers (a session on each; the
    gateway's episodes, `pathways.serving.episodes`). Both take the same steps.

    `act(obs)` takes one observation (obs_dim floats) and returns one action (an int, or a
    float32 vector in [-1, 1]); `reset()` starts a new episode (a new session).
    """

    def __init__(self, executor, pathway: str, window: int | None = None):
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
        self.obs_dim = first.input_contract[1]
        self.discrete = getattr(last, "space", "discrete") == "discrete"
        self.max_seq_len = p.max_seq_len
        remote = hasattr(executor, "prefill_inputs")
        self._session = (_RemoteSession if remote else _EngineSession)(executor, p)
        self._history: collections.deque = collections.deque(maxlen=self.k)
        self._steps = 0

    @property
    def steps(self) -> int:
        """Observations taken in this episode so far (at most the window's are kept)."""
        return self._steps

    def reset(self) -> None:
        """Ends the current episode's session and opens a new one."""
        self.close()
        self._session.open()
        self._history.clear()
        self._steps = 0

    def close(self) -> None:
        self._session.close()

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
        if not self._session.is_open:
            self.reset()
        n = len(self._history)
        if n < self.k:  # a decode step at the next position
            out = self._session.decode(x[None, None], n)
        else:  # the window is full: re-prefill the last k steps at positions 0..k-1
            out = self._session.prefill(np.stack([*list(self._history)[1:], x])[None])
        # Only a step that ran joins the episode: a failed one (a remote error) can be retried.
        self._history.append(x)
        self._steps += 1
        return out

    def act(self, obs):
        """The action for one observation: the most likely choice, or the mean in [-1, 1]."""
        return choose(self.outputs(obs), self.discrete)


class _EngineSession:
    """An episode's session on a LocalExecutor's engines (their slot pools), one module step
    after another as module servers run them."""

    def __init__(self, executor, p):
        self.executor, self.max_seq_len = executor, p.max_seq_len
        self.engines = [executor.engines[m] for m in p.modules]
        self.slots: dict[str, np.ndarray] | None = None

    @property
    def is_open(self) -> bool:
        return self.slots is not None

    def open(self) -> None:
        with self.executor._lock:
            self.slots = {e.name: e.take(1) for e in self.engines if e.kind.has_cache}

    def close(self) -> None:
        if self.slots is not None:
            with self.executor._lock:
                for e in self.engines:
                    if e.name in self.slots:
                        e.give(self.slots[e.name])
            self.slots = None

    def _run(self, xs, positions) -> np.ndarray:
        window = bucket(int(positions.max()) + 1, self.max_seq_len)
        with self.executor._lock:
            for e in self.engines:
                xs = e.step(xs, positions, self.slots.get(e.name), window=window)
        return np.asarray(xs)[0, -1]

    def decode(self, x, position: int) -> np.ndarray:
        return self._run(x, np.array([[position]], np.int32))

    def prefill(self, xs) -> np.ndarray:
        return self._run(xs, np.arange(xs.shape[1], dtype=np.int32)[None])


class _RemoteSession:
    """An episode's session on a RemoteExecutor's module servers: a decode step per
    observation, a prefill from position 0 once the window is full; the head's outputs come
    back as its logits. A replica lost mid-episode is replaced by replaying the session's calls
    since its last full window (`RemoteExecutor`)."""

    def __init__(self, executor, p):
        self.executor, self.pathway = executor, p.name
        self.session = None

    @property
    def is_open(self) -> bool:
        return self.session is not None

    def open(self) -> None:
        from pathways.sampling import SamplingParams

        self.session = self.executor.open_session(self.pathway, [SamplingParams()])

    def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            self.executor.close_session(session)

    def decode(self, x, position: int) -> np.ndarray:
        assert int(self.session.lengths[0]) == position, (self.session.lengths, position)
        _, logits = self.executor.decode_inputs(self.session, x, return_logits=True)
        return logits[0]

    def prefill(self, xs) -> np.ndarray:
        _, logits = self.executor.prefill_inputs(
            self.session, xs, np.zeros(1, np.int32), return_logits=True
        )
        return logits[0]


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


def rollout(env: Env | str, policy, seeds, on_step=None, on_reset=None) -> Rollouts:
    """Runs one episode per seed with `policy` (anything with `reset()` and `act(obs)`; the
    experts: `ExpertPolicy`), timing each `act`; `on_reset(env)` and `on_step(env, action)`
    see every episode's start and steps."""
    env = Env(env) if isinstance(env, str) else env
    episodes, times = [], []
    for seed in seeds:
        obs = env.reset(int(seed))
        if on_reset:
            on_reset(env)
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
