"""Tests for the executor helpers shared by the local and remote executors."""

import numpy as np

from pathways.executor.base import bucket, pad_prompts


def test_bucket_rounds_up_to_a_power_of_two_within_limits():
    assert [bucket(n, 1024) for n in (1, 32, 33, 100, 1000)] == [32, 32, 64, 128, 1024]
    assert bucket(3, 100, minimum=8) == 8
    assert bucket(700, 512) == 512  # never past the limit


def test_pad_prompts_right_pads_with_dropped_positions():
    tokens, positions, last = pad_prompts([[5, 6, 7], [8]], np.array([0, 4]), pad_position=24)
    assert tokens.shape == positions.shape and tokens.shape[1] >= 3
    assert tokens[0, :3].tolist() == [5, 6, 7] and tokens[1, 0] == 8
    assert positions[0, :3].tolist() == [0, 1, 2]
    assert positions[1, 0] == 4  # continues where the sequence left off
    assert (positions[0, 3:] == 24).all() and (positions[1, 1:] == 24).all()
    assert last.tolist() == [2, 0]
