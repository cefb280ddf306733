"""Tests for the action head: hand-computed behaviour-cloning losses, padding, acting."""

import numpy as np
import pytest
from flax import nnx

from pathways.modules import ConfigError
from pathways.modules.action import Action, ActionConfig


def _h(seed, shape=(2, 3, 7)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _reference(m, h, squash=False):
    h = np.asarray(h, np.float64)
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    x = (h - mu) / np.sqrt(var + 1e-5) * np.asarray(m.norm.scale[...]) + np.asarray(
        m.norm.bias[...]
    )
    y = x @ np.asarray(m.head.kernel[...]) + np.asarray(m.head.bias[...])
    return np.tanh(y) if squash else y


def test_discrete_loss_is_cross_entropy_over_real_steps():
    m = Action(ActionConfig(d_model=7, space="discrete", actions=5, init_std=0.5), nnx.Rngs(0))
    h = _h(1)
    targets = np.array([[4, 0, -1], [2, -1, -1]], np.int32)  # -1: padding steps
    z = _reference(m, h)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = [-logp[0, 0, 4], -logp[0, 1, 0], -logp[1, 0, 2]]
    np.testing.assert_allclose(float(m.loss(h, targets)), np.mean(ce), rtol=1e-5)
    mask = np.array([[1, 0, 1], [1, 1, 1]], np.float32)
    np.testing.assert_allclose(float(m.loss(h, targets, mask)), np.mean(ce[::2]), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(m.act(h)), z.argmax(-1))
    assert np.asarray(m.act(h)).dtype == np.int32


@pytest.mark.parametrize("squash", ["none", "tanh"])
def test_continuous_loss_is_mean_squared_error_skipping_nan_steps(squash):
    cfg = ActionConfig(d_model=7, space="continuous", actions=2, squash=squash, init_std=0.5)
    m = Action(cfg, nnx.Rngs(0))
    h = _h(2)
    targets = np.random.default_rng(3).uniform(-1, 1, (2, 3, 2)).astype(np.float32)
    targets[1, 2] = np.nan  # a padding step
    mean = _reference(m, h, squash == "tanh")
    err = (mean - targets) ** 2
    want = np.mean(
        [err[0, 0].mean(), err[0, 1].mean(), err[0, 2].mean(), err[1, 0].mean(), err[1, 1].mean()]
    )
    np.testing.assert_allclose(float(m.loss(h, targets)), want, rtol=1e-5)
    # The padding step's NaN reaches no gradient.
    grads = nnx.grad(lambda mod: mod.loss(h, targets))(m)
    assert all(np.isfinite(np.asarray(g)).all() for g in __import__("jax").tree.leaves(grads))
    acted = np.asarray(m.act(h))
    np.testing.assert_allclose(acted, np.clip(mean, -1, 1), rtol=1e-4, atol=1e-5)
    if squash == "tanh":
        assert np.abs(np.asarray(m(h * 100))).max() <= 1


def test_config_errors_name_field_and_value():
    with pytest.raises(ConfigError, match="space must be one of discrete, continuous; got 'x'"):
        ActionConfig(d_model=4, space="x", actions=2)
    with pytest.raises(ConfigError, match="squash 'tanh' is for continuous actions"):
        ActionConfig(d_model=4, space="discrete", actions=3, squash="tanh")
    with pytest.raises(ConfigError, match="needs >= 2 actions, got 1"):
        ActionConfig(d_model=4, space="discrete", actions=1)
    assert ActionConfig(d_model=4, space="continuous", actions=2).output_contract == ("actions", 2)
