"""The experts solve their tasks: the grid planner on hand-made grids and real minigrid episodes,
the Reacher controller on real MuJoCo episodes."""

import numpy as np
import pytest

from pathways.robotics import experts
from pathways.robotics.envs import Env, info
from pathways.robotics.experts import (
    AGENT,
    DOOR,
    EMPTY,
    FORWARD,
    GOAL,
    KEY,
    LEFT,
    LOCKED,
    PICKUP,
    RIGHT,
    TOGGLE,
    WALL,
    NoPath,
    grid_expert,
)


def _grid(rows: list[str], direction: int = 0) -> np.ndarray:
    """'#' wall, '.' empty, 'A' agent, 'K' key, 'D' locked door, 'G' goal."""
    codes = {"#": (WALL, 5, 0), ".": (EMPTY, 0, 0), "A": (AGENT, 0, direction)}
    codes.update({"K": (KEY, 4, 0), "D": (DOOR, 4, LOCKED), "G": (GOAL, 1, 0)})
    return np.array([[codes[c] for c in r] for r in rows], np.int64)


def _play(grid: np.ndarray, limit: int = 50) -> list[int]:
    """Follows the expert on a hand-made grid by applying its actions to the grid itself."""
    grid = grid.copy()
    actions = []
    under = (EMPTY, 0, 0)  # what the agent stands on
    for _ in range(limit):
        a = grid_expert(grid)
        actions.append(a)
        (y, x), d = np.argwhere(grid[..., 0] == AGENT)[0], grid[..., 2][grid[..., 0] == AGENT][0]
        dy, dx = experts.STEP[d]
        front = grid[y + dy, x + dx]
        if a in (LEFT, RIGHT):
            grid[y, x, 2] = (d + (3 if a == LEFT else 1)) % 4
        elif a == PICKUP:
            grid[y + dy, x + dx] = (EMPTY, 0, 0)
        elif a == TOGGLE:
            grid[y + dy, x + dx, 2] = 0
        elif a == FORWARD:
            if front[0] == GOAL:
                return actions
            grid[y, x], under = under, tuple(front)
            grid[y + dy, x + dx] = (AGENT, 0, d)
    raise AssertionError(f"no goal within {limit} steps: {actions}")


def test_grid_expert_fetches_the_key_opens_the_door_and_walks_to_the_goal():
    grid = _grid(
        [
            "######",
            "#A.#.#",
            "#..D.#",
            "#K.#G#",
            "######",
        ]
    )
    actions = _play(grid)
    # Facing east; the key is two cells south: turn, step, pick it up; then east to the door,
    # open it, walk through, turn south onto the goal.
    assert actions.count(PICKUP) == 1 and actions.count(TOGGLE) == 1
    assert actions.index(PICKUP) < actions.index(TOGGLE)
    assert actions == [
        RIGHT,
        FORWARD,
        PICKUP,
        LEFT,
        FORWARD,
        TOGGLE,
        FORWARD,
        FORWARD,
        RIGHT,
        FORWARD,
    ]
    assert actions == [1, 2, 3, 0, 2, 5, 2, 2, 1, 2]  # minigrid's action numbers


def test_grid_expert_breaks_ties_by_a_fixed_order_and_refuses_a_closed_maze():
    open_room = _grid(["#####", "#A..#", "#...#", "#..G#", "#####"])
    # Several shortest paths: going straight first (east) is taken.
    assert grid_expert(open_room) == FORWARD
    assert _play(open_room) == [FORWARD, FORWARD, RIGHT, FORWARD, FORWARD]
    walled = _grid(["#####", "#A#.#", "###G#", "#####"])
    with pytest.raises(NoPath, match="row 1, column 1"):
        grid_expert(walled)
    with pytest.raises(ValueError, match="exactly one agent"):
        grid_expert(_grid(["###", "#.#", "###"]))


@pytest.mark.parametrize("name", ["doorkey", "fourrooms"])
def test_grid_expert_solves_real_minigrid_episodes(name):
    env = Env(name)
    for seed in range(5):
        env.reset(seed)
        while not env.done:
            env.step(env.expert())
        ep = env.episode()
        assert ep.success and ep.ret > 0.5 and ep.steps < info(name).max_steps // 2, ep


def test_reacher_expert_puts_the_fingertip_on_the_target():
    env = Env("reacher")
    for seed in range(3):
        env.reset(seed)
        start = np.linalg.norm(env.obs[8:10])
        while not env.done:
            action = env.expert()
            assert action.shape == (2,) and action.dtype == np.float32
            assert np.all(np.abs(action) <= 1)
            env.step(action)
        ep = env.episode()
        assert ep.steps == 50 and ep.final_distance < 1e-3 < start, ep
        assert ep.success


def test_reacher_inverse_kinematics_reaches_the_target():
    # At rest with the target at a reachable point, the controller's error is zero only where
    # the forward kinematics of the angles lands on the target.
    l1, l2 = experts.LINKS
    q = np.array([0.7, -1.1])
    tip = np.array(
        [l1 * np.cos(q[0]) + l2 * np.cos(q.sum()), l1 * np.sin(q[0]) + l2 * np.sin(q.sum())]
    )
    obs = np.concatenate([np.cos(q), np.sin(q), tip, [0, 0], [0, 0, 0]]).astype(np.float32)
    np.testing.assert_allclose(experts.reacher_expert(obs), 0, atol=1e-5)
    moved = obs.copy()
    moved[4:6] = tip * 0.8  # the target moved inwards: the elbow bends further
    assert experts.reacher_expert(moved)[1] < -1e-3
