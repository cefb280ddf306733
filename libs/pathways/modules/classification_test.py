"""Tests for the classification head: pooled logits and cross-entropy against NumPy references."""

import numpy as np
import pytest
from flax import nnx

from pathways.modules import ConfigError
from pathways.modules.classification import Classification, ClassificationConfig

CFG = ClassificationConfig(d_model=11, n_classes=5)


def _hidden(seed, shape=(3, 7, 11)):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _reference_logits(m, h):
    """LayerNorm per position, mean over positions, then the dense layer (float64)."""
    h = np.asarray(h, np.float64)
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    normed = (h - mu) / np.sqrt(var + CFG.norm_eps)
    normed = normed * np.asarray(m.norm.scale[...]) + np.asarray(m.norm.bias[...])
    pooled = normed.mean(axis=1)
    return pooled @ np.asarray(m.head.kernel[...]) + np.asarray(m.head.bias[...])


def _head(seed=0):
    m = Classification(ClassificationConfig(d_model=11, n_classes=5, init_std=0.5), nnx.Rngs(seed))
    return m


def test_logits_pool_over_positions():
    m = _head()
    h = _hidden(1)
    logits, cache = m.step(h, None)
    assert cache is None and logits.shape == (3, 5) and logits.dtype == np.float32
    np.testing.assert_allclose(np.asarray(logits), _reference_logits(m, h), rtol=1e-4, atol=1e-5)


def test_loss_is_hand_computed_cross_entropy():
    m = _head()
    h, labels = _hidden(2), np.array([4, 0, 2], np.int32)
    z = _reference_logits(m, h)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -logp[np.arange(3), labels]
    np.testing.assert_allclose(float(m.loss(h, labels)), ce.mean(), rtol=1e-5)
    mask = np.array([1, 0, 1], np.float32)  # the masked example does not count
    np.testing.assert_allclose(float(m.loss(h, labels, mask)), ce[[0, 2]].mean(), rtol=1e-5)


def test_probabilities_and_prediction():
    m = _head()
    h = _hidden(3)
    p = np.asarray(m.probabilities(h))
    np.testing.assert_allclose(p.sum(-1), np.ones(3), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m.predict(h)), _reference_logits(m, h).argmax(-1))


def test_rows_without_positions_are_refused():
    with pytest.raises(ValueError, match=r"\(B, T, D\); got \(3, 11\)"):
        _head()(np.zeros((3, 11), np.float32))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(n_classes=1), "n_classes must be at least 2, got 1"),
        (dict(d_model=0), "d_model must be a positive integer, got 0"),
        (dict(norm="batch"), "norm must be one of layernorm, rmsnorm; got 'batch'"),
    ],
)
def test_config_errors_name_field_and_value(kwargs, words):
    with pytest.raises(ConfigError) as e:
        ClassificationConfig(**(dict(d_model=11, n_classes=5) | kwargs))
    assert words in str(e.value)


def test_contracts():
    assert CFG.input_contract == ("hidden", 11)
    assert CFG.output_contract == ("classes", 5)
