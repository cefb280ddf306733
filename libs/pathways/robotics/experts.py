"""Experts that demonstrate the robotics tasks: a shortest-path planner over a fully observed
minigrid grid, and inverse kinematics plus a PD controller for gymnasium's MuJoCo Reacher.

Both are deterministic functions of the observation alone, so a policy that imitates them sees
one answer per observation.
"""

from __future__ import annotations

import collections

import numpy as np

# minigrid's encoding (minigrid.core.constants): object index, colour index, state (a door's
# open/closed/locked, the agent's direction) per cell.
EMPTY, WALL, FLOOR, DOOR, KEY, GOAL, LAVA, AGENT = 1, 2, 3, 4, 5, 8, 9, 10
OPEN, CLOSED, LOCKED = 0, 1, 2
LEFT, RIGHT, FORWARD, PICKUP, TOGGLE = 0, 1, 2, 3, 5
# The order ties are broken in: of several shortest paths, the expert takes the one whose
# actions come first in this order (moving straight on before turning).
ORDER = (FORWARD, LEFT, RIGHT, PICKUP, TOGGLE)
STEP = ((0, 1), (1, 0), (0, -1), (-1, 0))  # (dy, dx) of directions 0 (east) .. 3 (north)


class NoPath(ValueError):
    """The grid has no path from the agent to a goal."""


def grid_expert(grid_hw3: np.ndarray) -> int:
    """The first action of a shortest path to a goal cell (minigrid actions: 0 left, 1 right,
    2 forward, 3 pickup, 5 toggle), by breadth-first search over (row, column, direction,
    carrying the key, doors opened) from the agent's state in `grid_hw3` (rows, columns,
    (object, colour, state) ints, as `FullyObsWrapper` shows it, rows first).

    A key that is not on the grid is the agent's (minigrid grids of these tasks hold one key,
    and the agent cannot drop it without the drop action, which the expert never takes).
    """
    grid = np.asarray(grid_hw3)
    objs, states = grid[..., 0], grid[..., 2]
    at = np.argwhere(objs == AGENT)
    if len(at) != 1:
        raise ValueError(f"the grid must show exactly one agent; it shows {len(at)}")
    (y, x), d = at[0], int(states[tuple(at[0])])
    doors = [tuple(p) for p in np.argwhere(objs == DOOR)]
    door_index = {p: i for i, p in enumerate(doors)}
    opened0 = sum(1 << i for i, p in enumerate(doors) if states[p] == OPEN)
    has_key0 = bool(doors) and not (objs == KEY).any()
    h, w = objs.shape

    def step(state, action):
        y, x, d, key, opened = state
        dy, dx = STEP[d]
        fy, fx = y + dy, x + dx
        front = int(objs[fy, fx]) if 0 <= fy < h and 0 <= fx < w else WALL
        if action == LEFT:
            return (y, x, (d + 3) % 4, key, opened)
        if action == RIGHT:
            return (y, x, (d + 1) % 4, key, opened)
        if action == FORWARD:
            if front in (EMPTY, FLOOR, GOAL, AGENT):
                return (fy, fx, d, key, opened)
            if front == DOOR and opened >> door_index[(fy, fx)] & 1:
                return (fy, fx, d, key, opened)
            if front == KEY and key:  # picked up: the cell is empty now
                return (fy, fx, d, key, opened)
            return None
        if action == PICKUP:
            return (y, x, d, True, opened) if front == KEY and not key else None
        if action == TOGGLE and front == DOOR:
            bit = 1 << door_index[(fy, fx)]
            if opened & bit:
                return None  # closing a door never shortens a path
            locked = states[fy, fx] == LOCKED
            return (y, x, d, key, opened | bit) if key or not locked else None
        return None

    start = (int(y), int(x), d, has_key0, opened0)
    seen = {start}
    queue = collections.deque([(start, None)])
    while queue:
        state, first = queue.popleft()
        for action in ORDER:
            nxt = step(state, action)
            if nxt is None or nxt in seen:
                continue
            head = action if first is None else first
            if objs[nxt[0], nxt[1]] == GOAL:
                return head
            seen.add(nxt)
            queue.append((nxt, head))
    raise NoPath(f"no path from the agent at row {y}, column {x} to a goal")


# Reacher-v5 (gymnasium/envs/mujoco/assets/reacher.xml): two links of 0.1 and 0.11 m in the
# plane; observation: cos q (2), sin q (2), target x y, joint velocities (2), fingertip -
# target (x, y): 10 floats.
LINKS = (0.1, 0.11)
KP, KD = 4.0, 0.3  # PD gains on joint angles (rad) and velocities (rad/s) -> action in [-1, 1]


def _wrap(a):
    return (a + np.pi) % (2 * np.pi) - np.pi


def reacher_expert(obs: np.ndarray, kp: float = KP, kd: float = KD) -> np.ndarray:
    """Torques (2,) float32 in [-1, 1]: joint angles that put the fingertip on the target by
    inverse kinematics (of the elbow-up and elbow-down solutions, the one nearer the current
    angles), reached by a PD controller on the angles. Over 100 episodes the fingertip ends
    about 1e-4 m from the target (`tools/bench/robotics.py` reports the figure)."""
    obs = np.asarray(obs, np.float64)
    q = np.arctan2(obs[2:4], obs[0:2])
    tx, ty = obs[4], obs[5]
    l1, l2 = LINKS
    c2 = np.clip((tx * tx + ty * ty - l1 * l1 - l2 * l2) / (2 * l1 * l2), -1.0, 1.0)
    best = None
    for sign in (1.0, -1.0):
        q2 = sign * np.arccos(c2)
        q1 = np.arctan2(ty, tx) - np.arctan2(l2 * np.sin(q2), l1 + l2 * np.cos(q2))
        err = _wrap(np.array([q1, q2]) - q)
        if best is None or np.abs(err).sum() < np.abs(best).sum():
            best = err
    return np.clip(kp * best - kd * obs[6:8], -1.0, 1.0).astype(np.float32)
