"""Expert demonstrations of the robotics tasks (`pathways.robotics`) as windows of time steps:
generated deterministically from episode seeds by the library's experts, cached in memory and
on disk, batches a pure function of (seed, step).

A policy sees the last K steps of its episode (K <= the pathway's max_seq_len), at positions
0..K-1 (fewer while the episode is shorter than K). A training example is a window of K
consecutive steps of one episode, starting anywhere from its first step; each position's target
is the expert's action at that step. Position i of a window sees i + 1 steps, so the examples
hold every context acting produces: from the episode's start while it is shorter than K, then
exactly the last K steps (`pathways.robotics.policy`).

Demonstrations can be noisy (DART): with probability `noise` a step executes a random action
(grids: turn or move; Reacher: the expert's torques plus Gaussian noise) while its target stays
the expert's action, so the data shows how to recover from mistakes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from pathways.robotics.envs import Env, EnvInfo, info
from pathways.spec import PathwaySpec

VERSION = 1  # bump when generation changes: the disk cache is keyed by it
NO_ACTION = -1  # a discrete target at a padding step
SPLIT_SEEDS = {"train": 1_000_000, "eval": 2_000_000}  # episode seeds; tests use 0, 1, 2 ...
GRID_NOISE_ACTIONS = (0, 1, 2)  # left, right, forward
REACHER_NOISE_STD = 0.3
# What each task trains on by default (coordinator jobs with JobRequest.dataset = the task,
# `pathways demo --task robotics`); tools/bench/robotics.py records the same recipe.
RECIPES = {
    "doorkey": {"episodes": 1000, "eval_episodes": 50, "noise": 0.1},
    "fourrooms": {"episodes": 1000, "eval_episodes": 50, "noise": 0.1},
    "reacher": {"episodes": 1000, "eval_episodes": 50, "noise": 0.3},
}


@dataclasses.dataclass(frozen=True)
class Demonstrations:
    """Expert episodes of one task, train and eval splits; `batch` has `TokenData.batch`'s
    signature (`seq_len` is the window K), so the same `Trainer` loop trains on it.

    Targets: discrete tasks int32 (B, K) actions, NO_ACTION (-1) at padding steps; continuous
    tasks float32 (B, K, A), NaN at padding steps (the `action` head's loss skips both).
    """

    env: str
    obs: dict[str, np.ndarray]  # split -> (N, obs_dim) float32, episodes one after another
    actions: dict[str, np.ndarray]  # split -> (N,) int32 or (N, A) float32 expert actions
    starts: dict[str, np.ndarray]  # split -> (E + 1,) int64 episode boundaries in obs
    name: str = "demonstrations"

    @property
    def info(self) -> EnvInfo:
        return info(self.env)

    def episodes(self, split: str = "train") -> int:
        return len(self.starts[split]) - 1

    def steps(self, split: str = "train") -> int:
        return len(self.obs[split])

    def windows(self, split: str, k: int) -> np.ndarray:
        """(W, 2) int64 (start step, length) of every window of up to `k` steps that starts
        inside an episode and does not run past its end by more than its padding: one per
        start from the episode's first step to its last full window (one, padded, when the
        episode is shorter than k)."""
        return _windows(self.starts[split].tobytes(), k)

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, split: str = "train"):
        """(observations (B, K, obs_dim) float32, targets) with K = `seq_len`. Train: epochs of
        every window, each shuffled by (seed, epoch); eval: consecutive windows in order."""
        wins = self.windows(split, seq_len)
        n = len(wins)
        at = step * batch_size + np.arange(batch_size)
        if split == "train":
            idx = np.empty(batch_size, np.int64)
            for epoch in np.unique(at // n):
                rows = at // n == epoch
                idx[rows] = np.random.default_rng([seed, int(epoch)]).permutation(n)[at[rows] % n]
        else:
            idx = at % n
        return self.gather(split, wins[idx], seq_len)

    def gather(self, split: str, wins: np.ndarray, k: int):
        """The windows `wins` ((B, 2) start, length) as (observations, targets), padded to k."""
        obs, acts = self.obs[split], self.actions[split]
        b = len(wins)
        x = np.zeros((b, k, obs.shape[1]), np.float32)
        if acts.ndim == 1:
            y = np.full((b, k), NO_ACTION, np.int32)
        else:
            y = np.full((b, k, acts.shape[1]), np.nan, np.float32)
        for i, (s, n) in enumerate(wins):
            x[i, :n] = obs[s : s + n]
            y[i, :n] = acts[s : s + n]
        return x, y

    def check_pathway(self, spec: PathwaySpec, pathway: str) -> None:
        """Raises ValueError naming the module, field and values when `pathway` cannot read
        these observations or output these actions."""
        e = self.info
        chain = spec.pathway(pathway).modules
        first, last = spec.modules[chain[0]], spec.modules[chain[-1]]
        if first.input_contract != ("observation", e.obs_dim):
            raise ValueError(
                f"pathway {pathway!r}: {chain[0]!r} ({first.kind}) reads "
                f"{first.input_contract[0]} of size {first.input_contract[1]} but {e.name} "
                f"observations are {e.obs_dim} floats ({'x'.join(map(str, e.obs_shape))})"
            )
        space = getattr(last, "space", None)
        if last.output_contract != ("actions", e.action_size) or space != e.actions:
            raise ValueError(
                f"pathway {pathway!r}: {chain[-1]!r} ({last.kind}) outputs "
                f"{last.output_contract[0]} of size {last.output_contract[1]} (space {space}) "
                f"but {e.name} takes {e.action_size} {e.actions} actions"
            )


@functools.lru_cache(maxsize=64)
def _windows(starts_bytes: bytes, k: int) -> np.ndarray:
    if k < 1:
        raise ValueError(f"the window must hold at least one step; got {k}")
    starts = np.frombuffer(starts_bytes, np.int64)
    out = []
    for a, b in zip(starts[:-1], starts[1:]):
        length = int(b - a)
        first = np.arange(a, a + max(length - k, 0) + 1)
        out.append(np.stack([first, np.full(len(first), min(length, k))], 1))
    return np.concatenate(out).astype(np.int64)


def generate(env_name: str, seeds, noise: float = 0.0, noise_seed: int = 0):
    """Expert episodes for `seeds`: (observations (N, obs_dim), expert actions, starts (E + 1,)).

    Each step records the observation and the expert's action for it; the action executed is
    the expert's, or with probability `noise` a random one (drawn from (noise_seed, episode
    seed)). An episode ends when the environment ends it (goal, time limit)."""
    env = Env(env_name)
    e = env.info
    obs, acts, starts = [], [], [0]
    for seed in seeds:
        rng = np.random.default_rng([noise_seed, int(seed)])
        o = env.reset(int(seed))
        while not env.done:
            a = env.expert()
            obs.append(o)
            acts.append(a)
            if noise and rng.random() < noise:
                if e.actions == "discrete":
                    a = int(rng.choice(GRID_NOISE_ACTIONS))
                else:
                    a = np.clip(a + rng.normal(0, REACHER_NOISE_STD, a.shape), -1, 1)
            o, _, _ = env.step(a)
        starts.append(len(obs))
    env.close()
    dtype = np.int32 if e.actions == "discrete" else np.float32
    return (
        np.asarray(obs, np.float32).reshape(-1, e.obs_dim),
        np.asarray(acts, dtype),
        np.asarray(starts, np.int64),
    )


def cache_dir() -> Path:
    """$PATHWAYS_CACHE_DIR/demonstrations, else $XDG_CACHE_HOME or ~/.cache
    /pathways/demonstrations."""
    if os.environ.get("PATHWAYS_CACHE_DIR"):
        return Path(os.environ["PATHWAYS_CACHE_DIR"]) / "demonstrations"
    base = os.environ.get("XDG_CACHE_HOME") or (
        os.path.join(os.environ["HOME"], ".cache") if os.environ.get("HOME") else None
    )
    return Path(base or tempfile.gettempdir()) / "pathways" / "demonstrations"


@functools.cache
def demonstrations(
    env: str,
    episodes: int = 1000,
    eval_episodes: int = 50,
    noise: float = 0.1,
    seed: int = 0,
    cache: bool = True,
) -> Demonstrations:
    """`episodes` training and `eval_episodes` evaluation episodes of the expert on `env`
    (episode seeds SPLIT_SEEDS[split] + i, disjoint from the small seeds tests and benchmarks
    act on), with DART noise `noise` drawn from `seed`. Kept in memory, and on disk under
    `cache_dir()` (keyed by every argument and VERSION) unless `cache` is False."""
    e = info(env)
    if not 0 <= noise < 1:
        raise ValueError(f"noise must be in [0, 1); got {noise}")
    if episodes < 1 or eval_episodes < 1:
        raise ValueError(
            f"episodes and eval_episodes must be >= 1; got {episodes}, {eval_episodes}"
        )
    key = json.dumps([VERSION, e.name, episodes, eval_episodes, noise, seed])
    path = cache_dir() / f"{e.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if cache and path.exists():
        with np.load(path) as f:
            parts = {k: f[k] for k in f.files}
    else:
        parts = {}
        for split, n in (("train", episodes), ("eval", eval_episodes)):
            seeds = SPLIT_SEEDS[split] + np.arange(n)
            o, a, s = generate(e.name, seeds, noise if split == "train" else 0.0, seed)
            parts.update({f"{split}_obs": o, f"{split}_actions": a, f"{split}_starts": s})
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **parts)
            os.replace(tmp, path)  # readers never see half a file
    splits = ("train", "eval")
    return Demonstrations(
        e.name,
        obs={s: parts[f"{s}_obs"] for s in splits},
        actions={s: parts[f"{s}_actions"] for s in splits},
        starts={s: parts[f"{s}_starts"] for s in splits},
        name=f"{e.name} demonstrations",
    )
