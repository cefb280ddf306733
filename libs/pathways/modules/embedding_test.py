"""Tests for the embedding module: shapes, learned vs no positions, padding, config errors."""

import numpy as np
import pytest
from flax import nnx

from pathways.modules import ConfigError
from pathways.modules.embedding import Embedding, EmbeddingConfig

CFG = EmbeddingConfig(vocab_size=37, d_model=24, max_seq_len=11)


def _positions(b, t):
    return np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))


def test_shape_and_dtype():
    m = Embedding(CFG, nnx.Rngs(0))
    tokens = np.arange(2 * 7, dtype=np.int32).reshape(2, 7) % 37
    h = m(tokens, _positions(2, 7))
    assert h.shape == (2, 7, 24)
    assert h.dtype == np.float32


def test_learned_positions_add_a_per_position_vector():
    m = Embedding(CFG, nnx.Rngs(0))
    tokens = np.full((1, 5), 4, np.int32)
    h = np.asarray(m(tokens, _positions(1, 5)))
    table = np.asarray(m.tokens.embedding[...])
    pos_table = np.asarray(m.positions.embedding[...])
    np.testing.assert_allclose(h[0], table[4] + pos_table[:5], atol=1e-6)
    assert np.abs(h[0, 0] - h[0, 1]).max() > 1e-3  # same token, different positions


def test_no_positions_is_position_independent():
    m = Embedding(
        EmbeddingConfig(vocab_size=37, d_model=24, max_seq_len=11, positions="none"), nnx.Rngs(0)
    )
    assert not hasattr(m, "positions")
    tokens = np.array([[3, 3, 3]], np.int32)
    h = np.asarray(m(tokens, _positions(1, 3)))
    np.testing.assert_array_equal(h[0, 0], h[0, 2])


def test_padding_position_is_clipped_not_an_error():
    m = Embedding(CFG, nnx.Rngs(0))
    tokens = np.array([[5, 5]], np.int32)
    h = np.asarray(m(tokens, np.array([[10, 11]], np.int32)))  # 11 == max_seq_len: padding
    assert np.isfinite(h).all()
    np.testing.assert_array_equal(h[0, 0], h[0, 1])


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(vocab_size=0), ["vocab_size", "0"]),
        (dict(d_model=-24), ["d_model", "-24"]),
        (dict(max_seq_len=True), ["max_seq_len", "True"]),
        (dict(positions="sinusoidal"), ["positions", "'sinusoidal'"]),
        (dict(init_std=0), ["init_std", "0"]),
    ],
)
def test_config_errors_name_field_and_value(kwargs, words):
    base = dict(vocab_size=37, d_model=24, max_seq_len=11)
    with pytest.raises(ConfigError) as e:
        EmbeddingConfig(**{**base, **kwargs})
    for w in words:
        assert w in str(e.value)


def test_contracts():
    assert CFG.input_contract == ("tokens", 37)
    assert CFG.output_contract == ("hidden", 24)
