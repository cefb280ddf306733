"""Tests for the adapter kind: identity when fresh, a NumPy reference once trained, contracts."""

import numpy as np
import pytest
from flax import nnx

from pathways import spec as spec_lib
from pathways.modules import registry
from pathways.modules.adapter import Adapter, AdapterConfig

CFG = AdapterConfig(d_model=11, bottleneck=5)


def _x(seed=0):
    return np.random.default_rng(seed).standard_normal((3, 7, 11), dtype=np.float32)


def test_a_fresh_adapter_is_the_identity():
    m = Adapter(CFG, nnx.Rngs(0))
    y, cache = m.step(_x(), None)
    assert cache is None
    np.testing.assert_array_equal(np.asarray(y), _x())
    assert registry.get("adapter").identity(CFG) == CFG


def test_residual_bottleneck_matches_numpy():
    m = Adapter(CFG, nnx.Rngs(0))
    rng = np.random.default_rng(1)
    m.up.kernel.value = rng.standard_normal((5, 11)).astype(np.float32) * 0.3
    m.up.bias.value = rng.standard_normal(11).astype(np.float32) * 0.1
    x = _x(2).astype(np.float64)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    h = (x - mu) / np.sqrt(var + CFG.norm_eps) * np.asarray(m.norm.scale[...])
    h = h + np.asarray(m.norm.bias[...])
    r = h @ np.asarray(m.down.kernel[...]) + np.asarray(m.down.bias[...])
    r = 0.5 * r * (1 + np.tanh(np.sqrt(2 / np.pi) * (r + 0.044715 * r**3)))  # GELU (tanh)
    want = x + r @ np.asarray(m.up.kernel[...]) + np.asarray(m.up.bias[...])
    np.testing.assert_allclose(np.asarray(m.step(_x(2), None)[0]), want, rtol=1e-4, atol=1e-5)


def test_spec_contract_between_shared_modules():
    base = {
        "tokenizer": {"kind": "byte"},
        "modules": {
            "patches": {"kind": "image_embedding", "image_size": 8, "channels": 1,
                        "patch_size": 2, "d_model": 12},
            "shared": {"kind": "attention", "d_model": 12, "n_layers": 1, "n_heads": 2,
                       "max_seq_len": 16},
            "own": {"kind": "adapter", "d_model": 12, "bottleneck": 3},
            "classes": {"kind": "classification", "d_model": 12, "n_classes": 10},
        },
        "pathways": {"digits": ["patches", "shared", "own", "classes"]},
    }  # fmt: skip
    spec = spec_lib.from_dict(base)
    assert not spec.pathway("digits").causal
    base["modules"]["own"]["d_model"] = 13
    with pytest.raises(spec_lib.SpecError, match="own") as e:
        spec_lib.from_dict(base)
    assert "12" in str(e.value) and "13" in str(e.value)
    with pytest.raises(Exception, match="bottleneck"):
        AdapterConfig(d_model=12, bottleneck=0)
