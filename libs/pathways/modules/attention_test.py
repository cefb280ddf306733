"""Tests for the attention module: shapes, causality, KV-cache equivalence, identity init, config."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathways.modules import ConfigError
from pathways.modules.attention import Attention, AttentionConfig, empty_cache

# Tiny, odd dimensions so a wrong axis shows up as a shape error rather than a silent broadcast.
GPT2_LIKE = AttentionConfig(d_model=24, n_layers=5, n_heads=3, max_seq_len=16)
LLAMA_LIKE = AttentionConfig(
    d_model=36,
    n_layers=5,
    n_heads=3,
    n_kv_heads=1,
    max_seq_len=16,
    norm="rmsnorm",
    mlp="swiglu",
    positions="rope",
    bias=False,
)
B, T = 2, 9  # one batch shape for every full forward, so each variant compiles it once
VARIANTS = pytest.mark.parametrize("cfg", [GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "llama"])


@functools.partial(jax.jit, static_argnums=0)
def _call(graphdef, state, x, positions):
    return nnx.merge(graphdef, state)(x, positions)


@functools.partial(jax.jit, static_argnums=0)
def _call_bidirectional(graphdef, state, x, positions):
    return nnx.merge(graphdef, state).step(x, positions, causal=False)[0]


@functools.partial(jax.jit, static_argnums=0, static_argnames="window")
def _cached(graphdef, state, x, positions, cache, slots, *, window):
    return nnx.merge(graphdef, state).forward_cached(x, positions, cache, slots, window)


class _Jitted:
    """A module's entry points jitted over its state (eager op-by-op dispatch is far slower)."""

    def __init__(self, module):
        self.graphdef, self.state = nnx.split(module)

    def __call__(self, x, positions):
        return _call(self.graphdef, self.state, x, positions)

    def bidirectional(self, x, positions):
        return _call_bidirectional(self.graphdef, self.state, x, positions)

    def forward_cached(self, x, positions, cache, slots, window):
        return _cached(self.graphdef, self.state, x, positions, cache, slots, window=window)


def _module(cfg, seed=0, **overrides):
    # A larger init_std than the default so the blocks change the residual stream noticeably:
    # equivalence checks against a near-identity module would prove little.
    overrides.setdefault("init_std", 0.3)
    return _Jitted(Attention(dataclasses.replace(cfg, **overrides), nnx.Rngs(seed)))


def _positions(b, t):
    return np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))


def _normal(seed, shape):
    # Inputs are built in numpy: every distinct eager jax op would compile a program of its own.
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@VARIANTS
def test_forward_shape_and_dtype(cfg):
    m = _module(cfg)
    x = _normal(1, (B, T, cfg.d_model))
    y = m(x, _positions(B, T))
    assert y.shape == (B, T, cfg.d_model)
    assert y.dtype == jnp.float32
    assert not np.allclose(y, x, atol=1e-3)  # the blocks do something


@VARIANTS
def test_causal_future_inputs_do_not_change_earlier_outputs(cfg):
    m = _module(cfg)
    x = _normal(2, (B, T, cfg.d_model))
    x2 = x.copy()
    x2[:, 6] = _normal(3, (B, cfg.d_model))
    y, y2 = m(x, _positions(B, T)), m(x2, _positions(B, T))
    np.testing.assert_allclose(y[:, :6], y2[:, :6], atol=1e-5)
    assert np.abs(y[:, 6:] - y2[:, 6:]).max() > 1e-2  # later positions do see the change


@VARIANTS
def test_bidirectional_call_lets_earlier_positions_see_later_ones(cfg):
    """The mask is the call's: the same module (same parameters) attends both ways."""
    m = _module(cfg)
    x = _normal(2, (B, T, cfg.d_model))
    x2 = x.copy()
    x2[:, 6] = _normal(3, (B, cfg.d_model))
    y, y2 = m.bidirectional(x, _positions(B, T)), m.bidirectional(x2, _positions(B, T))
    assert np.abs(y[:, :6] - y2[:, :6]).max() > 1e-2
    # One layer: at the last position both masks see every position, so the same output.
    one = _module(cfg, n_layers=1)
    np.testing.assert_allclose(
        one.bidirectional(x, _positions(B, T))[:, -1], one(x, _positions(B, T))[:, -1], atol=1e-5
    )


def test_bidirectional_without_positions_is_permutation_equivariant():
    """No position information inside the module (GPT-2 style) and no causal mask: permuting
    the inputs permutes the outputs. A causal mask breaks this (checked, so the test can fail)."""
    m = _module(GPT2_LIKE)
    x = _normal(4, (B, T, GPT2_LIKE.d_model))
    perm = np.random.default_rng(5).permutation(T)
    pos = _positions(B, T)
    y, y_perm = m.bidirectional(x, pos), m.bidirectional(x[:, perm], pos)
    np.testing.assert_allclose(y_perm, np.asarray(y)[:, perm], atol=1e-5)
    causal, causal_perm = m(x, pos), m(x[:, perm], pos)
    assert np.abs(causal_perm - np.asarray(causal)[:, perm]).max() > 1e-2


@VARIANTS
def test_kv_cache_prefill_then_decode_equals_full_forward(cfg):
    """Two sessions of different lengths in out-of-order slots, beside an unrelated session."""
    m = _module(cfg)
    lengths, new = [5, 3], 4  # prompt lengths, then `new` one-token decode steps each (5 + 4 = T)
    xs = [
        jax.random.normal(jax.random.key(10 + i), (n + new, cfg.d_model))
        for i, n in enumerate(lengths)
    ]
    cache = empty_cache(cfg, slots=3)
    pad = cfg.max_seq_len  # padding positions are dropped

    # An unrelated session in slot 1, prefilled first: the others must neither see nor touch it.
    other = _normal(99, (1, 6, cfg.d_model))
    _, cache = m.forward_cached(other, _positions(1, 6), cache, np.array([1], np.int32), window=8)
    slot1 = jax.tree.map(lambda a: np.asarray(a[:, 1]), cache)

    slots = np.array([2, 0], np.int32)  # out of order on purpose
    t = max(lengths)
    x = np.zeros((2, t, cfg.d_model), np.float32)
    pos = np.full((2, t), pad, np.int32)
    for i, n in enumerate(lengths):
        x[i, :n] = xs[i][:n]
        pos[i, :n] = np.arange(n)
    y, cache = m.forward_cached(x, pos, cache, slots, window=8)
    outs = [[np.asarray(y[i, :n])] for i, n in enumerate(lengths)]
    for step in range(new):
        cur = np.array(lengths) + step  # each session at its own position
        x = np.stack([xs[i][cur[i]] for i in range(2)])[:, None]
        y, cache = m.forward_cached(x, cur[:, None].astype(np.int32), cache, slots, window=16)
        for i in range(2):
            outs[i].append(np.asarray(y[i]))

    # Reference: one full forward over both sequences, the shorter one right-padded with noise
    # (which causality keeps out of its real positions).
    padded = _normal(7, (2, T, cfg.d_model))
    for i, n in enumerate(lengths):
        padded[i, : n + new] = xs[i]
    full = m(padded, _positions(2, T))
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(np.concatenate(outs[i]), full[i, : n + new], atol=1e-4)
    for name in ("k", "v"):
        np.testing.assert_array_equal(cache[name][:, 1], slot1[name])


def test_kv_cache_layout():
    cache = empty_cache(LLAMA_LIKE, slots=3)
    # (layers, slots, positions, kv heads, head dim)
    assert cache["k"].shape == (5, 3, 16, 1, 12)
    assert cache["v"].shape == cache["k"].shape
    assert LLAMA_LIKE.kv_bytes_per_token() == 2 * 5 * 1 * 12 * 4


@VARIANTS
def test_zero_init_output_is_the_identity(cfg):
    m = _module(cfg, zero_init_output=True)
    x = _normal(4, (B, T, cfg.d_model))
    np.testing.assert_allclose(m(x, _positions(B, T)), x, atol=1e-5)
    y, _ = m.forward_cached(
        x, _positions(B, T), empty_cache(cfg, B), np.arange(B, dtype=np.int32), window=16
    )
    np.testing.assert_allclose(y, x, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(n_heads=5), ["n_heads (5)", "d_model (24)"]),
        (dict(n_kv_heads=2), ["n_kv_heads (2)", "n_heads (3)"]),
        (dict(n_layers=0), ["n_layers", "0"]),
        (dict(max_seq_len=-4), ["max_seq_len", "-4"]),
        (dict(d_model=24.0), ["d_model", "24.0"]),
        (dict(d_ff=0), ["d_ff", "0"]),
        (dict(norm="batchnorm"), ["norm", "'batchnorm'"]),
        (dict(mlp="relu"), ["mlp", "'relu'"]),
        (dict(positions="alibi"), ["positions", "'alibi'"]),
        (dict(n_heads=8, positions="rope"), ["head_dim", "3"]),  # 24 / 8 = 3 is odd
        (dict(norm_eps=0.0), ["norm_eps", "0.0"]),
        (dict(init_std=-1.0), ["init_std", "-1.0"]),
        (dict(rope_theta=0), ["rope_theta", "0"]),
    ],
)
def test_config_errors_name_field_and_value(kwargs, words):
    base = dict(d_model=24, n_layers=5, n_heads=3, max_seq_len=16)
    with pytest.raises(ConfigError) as e:
        AttentionConfig(**{**base, **kwargs})
    for w in words:
        assert w in str(e.value)


def test_config_derived_sizes():
    assert (GPT2_LIKE.head_dim, GPT2_LIKE.kv_heads, GPT2_LIKE.ff_dim) == (8, 3, 96)
    assert (LLAMA_LIKE.head_dim, LLAMA_LIKE.kv_heads) == (12, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPT2_LIKE.d_model = 36  # type: ignore[misc]
