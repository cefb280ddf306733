"""Tests for the observation embedding: both encoders against NumPy, positions, config checks."""

import numpy as np
import pytest
from flax import nnx

from pathways.modules import ConfigError, config_from_dict
from pathways.modules.observation_embedding import (
    ObservationEmbedding,
    ObservationEmbeddingConfig,
)


def _gelu(x):  # jax.nn.gelu's tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_vector_observations_scale_then_mlp_plus_learned_positions():
    cfg = ObservationEmbeddingConfig(
        "vector", obs_dim=3, d_model=5, max_seq_len=7, hidden=11, scale=(1.0, 2.0, 0.5)
    )
    m = ObservationEmbedding(cfg, nnx.Rngs(0))
    obs = np.random.default_rng(1).standard_normal((2, 4, 3)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3], [3, 4, 5, 7]], np.int32)  # 7 == max_seq_len: padding
    y, cache = m.step(obs, pos)
    assert cache is None and y.shape == (2, 4, 5)
    x = obs.astype(np.float64) * np.array([1.0, 2.0, 0.5])
    h = _gelu(x @ np.asarray(m.fc.kernel[...]) + np.asarray(m.fc.bias[...]))
    want = h @ np.asarray(m.out.kernel[...]) + np.asarray(m.out.bias[...])
    want = want + np.asarray(m.positions[...])[np.minimum(pos, 6)]
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)


def test_grid_cells_sum_object_colour_state_vectors():
    cfg = ObservationEmbeddingConfig(
        "grid",
        obs_dim=2 * 3 * 3,
        d_model=4,
        max_seq_len=5,
        grid_rows=2,
        grid_columns=3,
        cell_dim=6,
        conv_layers=0,
        init_std=0.5,
    )
    m = ObservationEmbedding(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(2)
    grid = np.stack(
        [rng.integers(0, 11, (2, 3)), rng.integers(0, 6, (2, 3)), rng.integers(0, 4, (2, 3))], -1
    )
    obs = grid.reshape(1, 1, -1).astype(np.float32)
    y = np.asarray(m.encode(obs))
    cells = (
        np.asarray(m.objects.embedding[...])[grid[..., 0]]
        + np.asarray(m.colours.embedding[...])[grid[..., 1]]
        + np.asarray(m.states.embedding[...])[grid[..., 2]]
    )  # (2, 3, 6), rows first
    want = cells.reshape(-1) @ np.asarray(m.out.kernel[...]) + np.asarray(m.out.bias[...])
    np.testing.assert_allclose(y[0, 0], want, rtol=1e-4, atol=1e-5)


def test_grid_convolutions_mix_neighbouring_cells_only():
    cfg = ObservationEmbeddingConfig(
        "grid",
        obs_dim=5 * 5 * 3,
        d_model=8,
        max_seq_len=2,
        grid_rows=5,
        grid_columns=5,
        conv_channels=4,
        conv_layers=1,
    )
    m = ObservationEmbedding(cfg, nnx.Rngs(0))
    base = np.ones((5, 5, 3), np.float32)
    changed = base.copy()
    changed[0, 0, 0] = 2  # a corner cell: one 3x3 convolution reaches its 2x2 neighbourhood
    a = np.asarray(m.convs[0](_cells(m, base)))
    b = np.asarray(m.convs[0](_cells(m, changed)))
    differ = np.abs(a - b).max(-1)[0] > 1e-7
    assert differ[:2, :2].all() and not differ[2:].any() and not differ[:, 2:].any()


def _cells(m, grid):
    g = grid.astype(np.int32)
    return (m.objects(g[..., 0]) + m.colours(g[..., 1]) + m.states(g[..., 2]))[None]


def test_config_errors_name_field_and_value():
    with pytest.raises(ConfigError, match=r"obs_dim \(10\) must be grid_rows \* grid_columns"):
        ObservationEmbeddingConfig("grid", 10, 4, 4, grid_rows=2, grid_columns=2)
    with pytest.raises(ConfigError, match="observation must be one of vector, grid; got 'image'"):
        ObservationEmbeddingConfig("image", 10, 4, 4)
    with pytest.raises(ConfigError, match="scale has 2 factors but obs_dim is 3"):
        ObservationEmbeddingConfig("vector", 3, 4, 4, scale=(1.0, 2.0))
    with pytest.raises(ConfigError, match="grid_rows must be a positive integer, got 0"):
        ObservationEmbeddingConfig("grid", 12, 4, 4)
    cfg = config_from_dict(
        {
            "kind": "observation_embedding",
            "observation": "vector",
            "obs_dim": 2,
            "d_model": 4,
            "max_seq_len": 3,
            "scale": [1, 2],
        }
    )
    assert cfg.scale == (1, 2) and hash(cfg)  # lists from YAML become tuples (hashable)
    m = ObservationEmbedding(cfg, nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"shape \(B, T, 2\) \(obs_dim 2\); got \(1, 3\)"):
        m.encode(np.zeros((1, 3), np.float32))
