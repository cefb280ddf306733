"""The simulated tasks: navigation on minigrid (DoorKey-8x8, FourRooms, fully observed) and
manipulation on gymnasium's MuJoCo Reacher, behind one small interface whose observations are
flat float32 vectors (what an `observation_embedding` module reads, one per time step)."""

from __future__ import annotations

import dataclasses

import numpy as np

from pathways.robotics.experts import grid_expert, reacher_expert


@dataclasses.dataclass(frozen=True)
class EnvInfo:
    """What a policy for a task reads and writes.

    Attributes:
        name: the short name (`pathways rollout --env NAME`).
        gym_id: gymnasium's id.
        observation: "grid" ((H, W, 3) minigrid (object, colour, state) ints, rows first) or
            "vector" (floats); either way flattened to `obs_dim` float32 values per step.
        obs_shape: (H, W, 3) or (dim,).
        actions: "discrete" (`action_size` choices) or "continuous" (`action_size` values in
            [-1, 1]).
        max_steps: the episode's step limit (the environment truncates there).
        success_distance: for Reacher, the final fingertip-to-target distance (m) counted a
            success; grids succeed by reaching the goal.
    """

    name: str
    gym_id: str
    observation: str
    obs_shape: tuple[int, ...]
    actions: str
    action_size: int
    max_steps: int
    success_distance: float = 0.0

    @property
    def obs_dim(self) -> int:
        return int(np.prod(self.obs_shape))


ENVS = {
    "doorkey": EnvInfo("doorkey", "MiniGrid-DoorKey-8x8-v0", "grid", (8, 8, 3), "discrete", 7, 640),
    "fourrooms": EnvInfo(
        "fourrooms", "MiniGrid-FourRooms-v0", "grid", (19, 19, 3), "discrete", 7, 100
    ),
    "reacher": EnvInfo("reacher", "Reacher-v5", "vector", (10,), "continuous", 2, 50, 0.02),
}


def info(name: str) -> EnvInfo:
    """The task called `name` (short name or gymnasium id); ValueError naming the known ones."""
    for e in ENVS.values():
        if name in (e.name, e.gym_id):
            return e
    known = ", ".join(f"{e.name} ({e.gym_id})" for e in ENVS.values())
    raise ValueError(f"unknown environment {name!r}; known: {known}")


@dataclasses.dataclass(frozen=True)
class Episode:
    """One finished episode: success, undiscounted return, steps taken, and for Reacher the
    final fingertip-to-target distance (NaN for grids)."""

    seed: int
    success: bool
    ret: float
    steps: int
    final_distance: float = float("nan")


class Env:
    """One environment of a task: `reset(seed)` and `step(action)` return flat float32
    observations; `expert()` is the expert's action for the current observation."""

    def __init__(self, name: str, render_mode: str | None = None):
        import gymnasium as gym

        self.info = info(name)
        if self.info.observation == "grid":
            import minigrid  # noqa: F401 - registers the MiniGrid-* ids
            from minigrid.wrappers import FullyObsWrapper

            self.env = FullyObsWrapper(gym.make(self.info.gym_id, render_mode=render_mode))
        else:
            self.env = gym.make(self.info.gym_id, render_mode=render_mode)
        self.obs = None

    def _encode(self, raw) -> np.ndarray:
        if self.info.observation == "grid":
            # minigrid encodes (columns, rows, 3); rows first reads like the picture.
            return (
                np.ascontiguousarray(raw["image"].transpose(1, 0, 2)).reshape(-1).astype(np.float32)
            )
        return np.asarray(raw, np.float32)

    def reset(self, seed: int) -> np.ndarray:
        raw, _ = self.env.reset(seed=int(seed))
        self.obs, self.seed, self.ret, self.steps, self.done = (
            self._encode(raw),
            seed,
            0.0,
            0,
            False,
        )
        self.success = False
        return self.obs

    def step(self, action) -> tuple[np.ndarray, float, bool]:
        """(observation, reward, done) after `action` (an int, or floats in [-1, 1])."""
        if self.obs is None or self.done:
            raise RuntimeError("reset() the environment before stepping it")
        if self.info.actions == "discrete":
            a = int(action)
            if not 0 <= a < self.info.action_size:
                raise ValueError(f"action {a} outside [0, {self.info.action_size})")
        else:
            a = np.clip(np.asarray(action, np.float32).reshape(self.info.action_size), -1, 1)
        raw, reward, terminated, truncated, _ = self.env.step(a)
        self.obs = self._encode(raw)
        self.ret += float(reward)
        self.steps += 1
        self.done = bool(terminated or truncated)
        if self.info.observation == "grid":
            self.success = self.success or (bool(terminated) and reward > 0)
        return self.obs, float(reward), self.done

    def expert(self):
        """The expert's action for the current observation."""
        if self.info.observation == "grid":
            return grid_expert(self.obs.reshape(self.info.obs_shape).astype(np.int64))
        return reacher_expert(self.obs)

    def episode(self) -> Episode:
        """The current episode's figures (final ones once `done`)."""
        dist = float("nan")
        if self.info.name == "reacher":
            dist = float(np.linalg.norm(self.obs[8:10]))
            return Episode(
                self.seed, dist <= self.info.success_distance, self.ret, self.steps, dist
            )
        return Episode(self.seed, self.success, self.ret, self.steps, dist)

    def close(self) -> None:
        self.env.close()
