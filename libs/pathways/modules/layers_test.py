"""Tests for the shared building blocks: rotary embeddings and grouped-query attention."""

import numpy as np

from pathways.modules.layers import attend, rope


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def test_rope_keeps_norms_and_depends_only_on_relative_position():
    q, k = _normal(0, (1, 1, 1, 12)), _normal(1, (1, 1, 1, 12))

    def score(m, n):
        qm = np.asarray(rope(q, np.array([[m]]), 10000.0))
        kn = np.asarray(rope(k, np.array([[n]]), 10000.0))
        return float((qm * kn).sum())

    np.testing.assert_allclose(score(3, 1), score(9, 7), rtol=1e-5)
    np.testing.assert_allclose(score(0, 0), float((q * k).sum()), rtol=1e-5)  # position 0: no-op
    assert abs(score(3, 1) - score(3, 2)) > 1e-3
    rotated = np.asarray(rope(q, np.array([[5]]), 10000.0))
    np.testing.assert_allclose(np.linalg.norm(rotated), np.linalg.norm(q), rtol=1e-5)


def test_grouped_query_attention_equals_repeated_kv_heads():
    b, t, n, kv, h = 2, 5, 6, 2, 3
    q, k, v = _normal(0, (b, t, n, h)), _normal(1, (b, t, kv, h)), _normal(2, (b, t, kv, h))
    mask = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))
    out = np.asarray(attend(q, k, v, mask)).reshape(b, t, n, h)
    # Reference: plain multi-head attention, query head i reading kv head i // (n // kv).
    k_rep, v_rep = np.repeat(k, n // kv, axis=2), np.repeat(v, n // kv, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k_rep) / np.sqrt(h)
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ref = np.einsum("bnts,bsnh->btnh", probs, v_rep)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_fully_masked_rows_stay_finite():
    q, k, v = _normal(0, (1, 2, 3, 4)), _normal(1, (1, 2, 3, 4)), _normal(2, (1, 2, 3, 4))
    out = np.asarray(attend(q, k, v, np.zeros((1, 2, 2), bool)))
    assert np.isfinite(out).all()
