"""DiLoCo's core: the H=1 plain-averaging case is data-parallel SGD; the outer step is per-module
Nesterov SGD; pseudo-gradients survive the wire (bfloat16: half the bytes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.parallel import diloco
from pathways.train import TrainConfig

SPEC = {
    "modules": {
        "embed": {"kind": "embedding", "vocab_size": 37, "d_model": 24, "max_seq_len": 16},
        "attn": {
            "kind": "attention",
            "d_model": 24,
            "n_layers": 1,
            "n_heads": 3,
            "max_seq_len": 16,
        },
        "head": {"kind": "decoding", "d_model": 24, "vocab_size": 37},
    },
    "pathways": {"p": ["embed", "attn", "head"]},
}


def executor() -> LocalExecutor:
    return LocalExecutor(spec_lib.from_dict(SPEC, source="test"), seed=3)


def tokens(n=3000) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 37, size=n).astype(np.int32)


def test_h1_plain_averaging_equals_synchronous_data_parallel_sgd():
    K, rounds, lr = 3, 3, 0.5
    train = TrainConfig(steps=rounds, batch_size=2, seq_len=11, lr=lr, warmup=0, clip=0.0)
    cfg = diloco.DiLoCoConfig(
        workers=K, inner_steps=1, inner="sgd", outer_lr=1.0, outer_momentum=0.0
    )
    data = tokens()
    ex = executor()
    history = diloco.simulate(ex, "p", train, cfg, data, rounds)

    ref = executor()  # same seed: same initial parameters
    names = ["embed", "attn", "head"]
    shards = [diloco.shard(data, K, k) for k in range(K)]
    for t in range(rounds):
        per_worker = [
            ref.loss_and_grads("p", *diloco.shard_batch(shards[k], k, t, 2, 11, train.seed))
            for k in range(K)
        ]
        assert [float(loss) for loss, _ in per_worker] == pytest.approx(
            [ls[0] for ls in history[t]["losses"]], rel=1e-5
        )
        for n in names:
            mean = jax.tree.map(lambda *g: sum(g) / K, *[g[n] for _, g in per_worker])
            ref.set_state(n, jax.tree.map(lambda p, g: p - lr * g, ref.state(n), mean))
    for n in names:
        for a, b in zip(jax.tree.leaves(ex.state(n)), jax.tree.leaves(ref.state(n))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        moved = max(
            float(jnp.abs(a - b).max())
            for a, b in zip(jax.tree.leaves(ex.state(n)), jax.tree.leaves(executor().state(n)))
        )
        assert moved > 1e-4, n  # the comparison is not between untouched parameters


def test_outer_step_is_nesterov_sgd_per_module_on_the_mean_of_reporters():
    cfg = diloco.DiLoCoConfig(outer_lr=0.7, outer_momentum=0.9)
    outer = diloco.OuterOptimizer(cfg)
    p = {"w": jnp.array([1.0, -2.0, 0.5])}
    state = outer.init(p)
    m = np.zeros(3)
    want = np.array([1.0, -2.0, 0.5])
    for pgs in ([[0.1, 0.2, 0.3], [0.3, 0.0, -0.1]], [[1.0, 1.0, 1.0]]):  # 2 then 1 reporter
        g = np.mean(pgs, axis=0)
        m = 0.9 * m + g
        want = want - 0.7 * (g + 0.9 * m)  # Nesterov: look ahead along the momentum
        p, state = outer.step(p, state, [{"w": jnp.array(x)} for x in pgs])
        np.testing.assert_allclose(np.asarray(p["w"]), want, rtol=1e-6)
    with pytest.raises(ValueError, match="at least one pseudo-gradient"):
        outer.step(p, state, [])


def test_pseudo_gradients_on_the_wire_float32_exact_bfloat16_half_the_bytes():
    ex = executor()
    g = ex.state("attn")
    local = jax.tree.map(lambda x: x * 0.9 + 0.01, g)
    pg = diloco.pseudo_gradient(g, local)
    exact = diloco.encode(pg, "none")
    half = diloco.encode(pg, "bfloat16")
    assert diloco.nbytes(half) * 2 == diloco.nbytes(exact) == diloco.nbytes(g)
    back = diloco.decode(exact, "none", g)
    assert jax.tree.structure(back) == jax.tree.structure(g)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(pg)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(diloco.decode(half, "bfloat16", g)), jax.tree.leaves(pg)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2**-8, atol=0)
    # int8 per block of 64: a quarter of the bytes plus one scale per block; every value within
    # half a step (scale = the block's largest magnitude / 127) of the original.
    q = diloco.encode(pg, "int8")
    # (rows here are 24 or 96 long: one scale per 24 values at worst, so < 0.3)
    assert diloco.nbytes(q) < 0.3 * diloco.nbytes(exact)
    for a, b in zip(jax.tree.leaves(diloco.decode(q, "int8", g)), jax.tree.leaves(pg)):
        b = np.asarray(b)
        step = np.abs(b).max() / 127
        assert np.abs(np.asarray(a) - b).max() <= step / 2 + 1e-9
    with pytest.raises(ValueError, match="payload has 1 arrays"):
        diloco.decode(exact[:1], "none", g)
    with pytest.raises(ValueError, match="2 array.s. each with compress 'int8'"):
        diloco.decode(q[:-1], "int8", g)
    with pytest.raises(ValueError, match=r"payload array 0 has shape \(2,\)"):
        diloco.decode([np.zeros(2, np.float32), *exact[1:]], "none", g)


def test_adamw_rounds_lower_the_loss_and_shards_are_disjoint():
    train = TrainConfig(steps=8, batch_size=4, seq_len=11, lr=1e-2, warmup=1)
    cfg = diloco.DiLoCoConfig(workers=2, inner_steps=4)
    data = np.tile(np.arange(37, dtype=np.int32), 60)  # learnable: a repeating sequence
    history = diloco.simulate(executor(), "p", train, cfg, data, rounds=2)
    first = np.mean([ls[0] for ls in history[0]["losses"]])
    last = np.mean([ls[-1] for ls in history[-1]["losses"]])
    assert last < first - 0.1, (first, last)
    a, b = diloco.shard(data, 2, 0), diloco.shard(data, 2, 1)
    assert len(a) == len(b) == len(data) // 2
    np.testing.assert_array_equal(np.concatenate([a, b]), data[: 2 * len(a)])


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"workers": 0}, "workers must be a positive integer, got 0"),
        ({"inner_steps": 2.5}, "inner_steps must be a positive integer, got 2.5"),
        ({"inner": "lion"}, "inner must be one of adamw, sgd; got 'lion'"),
        ({"compress": "int4"}, "compress must be one of none, bfloat16, int8; got 'int4'"),
        ({"outer_lr": 0}, "outer_lr must be a positive number, got 0"),
        ({"outer_momentum": 1.0}, r"outer_momentum must be in \[0, 1\), got 1.0"),
    ],
)
def test_config_errors_name_the_value(kw, words):
    with pytest.raises(ValueError, match=words):
        diloco.DiLoCoConfig(**kw)


def test_short_shard_and_unclipped_adamw_are_refused():
    with pytest.raises(ValueError, match="worker 1's shard has 10 tokens, fewer than seq_len 11"):
        diloco.shard_batch(np.zeros(10, np.int32), 1, 0, 2, 11, 0)
    with pytest.raises(ValueError, match="clip must be > 0, got 0.0"):
        diloco.inner_optimizer("adamw", TrainConfig(clip=0.0))
