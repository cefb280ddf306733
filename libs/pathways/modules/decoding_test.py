"""Tests for the decoding module: logits shape, cross-entropy against a reference, masking."""

import numpy as np
import pytest
from flax import nnx

from pathways.modules import ConfigError
from pathways.modules.decoding import Decoding, DecodingConfig

CFG = DecodingConfig(d_model=24, vocab_size=37)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _hidden(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize(
    "cfg",
    [CFG, DecodingConfig(d_model=24, vocab_size=37, norm="rmsnorm", bias=True)],
    ids=["layernorm", "rmsnorm"],
)
def test_logits_shape_and_dtype(cfg):
    m = Decoding(cfg, nnx.Rngs(0))
    logits = m(_hidden(0, (2, 7, 24)))
    assert logits.shape == (2, 7, 37)
    assert logits.dtype == np.float32


def test_loss_is_mean_token_cross_entropy():
    m = Decoding(CFG, nnx.Rngs(0))
    h = _hidden(1, (2, 5, 24))
    targets = np.random.default_rng(2).integers(0, 37, (2, 5)).astype(np.int32)
    logp = _log_softmax(np.asarray(m(h), np.float64))
    ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]  # (B, T)
    np.testing.assert_allclose(float(m.loss(h, targets)), ce.mean(), rtol=1e-5)

    mask = np.array([[1, 1, 0, 0, 0], [1, 0, 1, 0, 1]], np.int32)
    np.testing.assert_allclose(float(m.loss(h, targets, mask)), ce[mask == 1].mean(), rtol=1e-5)
    # An all-zero mask (a batch of padding) gives 0, not NaN.
    assert float(m.loss(h, targets, np.zeros_like(mask))) == 0.0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(vocab_size=-1), ["vocab_size", "-1"]),
        (dict(d_model="24"), ["d_model", "'24'"]),
        (dict(norm="groupnorm"), ["norm", "'groupnorm'"]),
        (dict(norm_eps=-1e-5), ["norm_eps", "-1e-05"]),
    ],
)
def test_config_errors_name_field_and_value(kwargs, words):
    with pytest.raises(ConfigError) as e:
        DecodingConfig(**{**dict(d_model=24, vocab_size=37), **kwargs})
    for w in words:
        assert w in str(e.value)


def test_contracts():
    assert CFG.input_contract == ("hidden", 24)
    assert CFG.output_contract == ("logits", 37)
