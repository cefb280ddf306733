"""Serving weight storage: bfloat16 and int8 copies hold what they say, cost what they say, and
a pathway served from them decodes like the float32 one within the rounding they imply."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways import weights
from pathways.executor.local import LocalExecutor
from pathways.kernels.testing import force_decision
from pathways.runtime import ModuleRuntime
from pathways.sampling import SamplingParams


def _spec():
    return spec_lib.from_dict(
        {
            "modules": {
                "embed": {"kind": "embedding", "vocab_size": 300, "d_model": 64, "max_seq_len": 32},
                "attn": {
                    "kind": "attention",
                    "d_model": 64,
                    "n_layers": 2,
                    "n_heads": 4,
                    "d_ff": 192,  # 64 rows widened per loop step: 192 = 3 chunks
                    "max_seq_len": 32,
                },
                "head": {"kind": "decoding", "d_model": 64, "vocab_size": 300},
            },
            "pathways": {"p": ["embed", "attn", "head"]},
        }
    )


def test_int8_kernel_round_trip_and_products():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(100, 37)).astype(np.float32)  # 100 rows: chunks of 50
    w[:, 3] = 0.0  # an all-zero column keeps scale 1, values 0
    q = weights.quantize_int8(w)
    assert q.dtype == jnp.int8 and q.shape == (104, 37)
    back = np.asarray(weights.dense_kernel(q))
    step = np.abs(w).max(axis=0) / 127
    assert np.all(np.abs(back - w) <= step / 2 + 1e-7)  # within half a step per column
    assert np.all(back[:, 3] == 0)
    x = rng.normal(size=(2, 5, 100)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(jax.jit(weights.matmul)(x, q)), x @ back, rtol=1e-5, atol=1e-4
    )
    bf = jnp.asarray(w).astype(jnp.bfloat16)
    np.testing.assert_allclose(
        np.asarray(jax.jit(weights.matmul)(x, bf)),
        x @ np.asarray(bf.astype(jnp.float32)),
        rtol=1e-5,
        atol=1e-4,
    )
    assert weights._chunk(100) == 50 and weights._chunk(97) == 1 and weights._chunk(2048) == 64


@pytest.mark.parametrize(
    ("storage", "share", "tol"), [("bfloat16", 0.52, 0.05), ("int8", 0.3, 0.1)]
)
def test_a_pathway_served_from_reduced_weights(storage, share, tol):
    spec = _spec()
    ref = LocalExecutor(spec, seed=1)
    states = {m: ref.state(m) for m in spec.modules}
    ex = LocalExecutor(spec, states, weights=storage, native=False)  # the default XLA path
    prompts = [[5, 9, 200, 17, 3], [42, 7]]

    def run(e):
        s = e.open_session("p", [SamplingParams()] * 2)
        r = e.prefill(s, prompts, return_logits=True)
        logits = [r.logits]
        for _ in range(4):
            r = e.decode(s, r.tokens, return_logits=True)
            logits.append(r.logits)
        e.close_session(s)
        return np.stack(logits, 1)

    want, got = run(ref), run(ex)
    # Logits of this random model have spread ~1: rounding moves them by a few hundredths.
    assert np.max(np.abs(got - want)) < tol * np.abs(want).max()
    assert np.max(np.abs(got - want)) > 0  # really a different copy
    for m in ("attn", "head"):  # kernels dominate; norms and biases stay float32
        rt = ex.runtimes[m]
        full, stored = weights.nbytes(rt.state), weights.nbytes(rt.serving_state)
        assert stored <= share * full, (m, stored, full)
    # The token table is held as bfloat16 for both; learned positions stay float32.
    rt = ex.runtimes["embed"]
    assert weights.nbytes(rt.serving_state) == weights.nbytes(rt.state) - 300 * 64 * 2


def test_compact_keeps_only_the_reduced_copy():
    spec = _spec()
    cfg = spec.modules["attn"]
    from pathways import modules as mod

    rt = ModuleRuntime("attn", cfg, mod.build(cfg, seed=0), weights="int8", native=False)
    full = weights.nbytes(rt.state)
    assert rt.compact()
    assert rt._state is None
    state = rt.state  # what the int8 copy holds, as float32, in the original shapes
    assert weights.nbytes(state) == full
    for leaf in jax.tree.leaves(state):
        assert leaf.dtype == jnp.float32
    f32 = ModuleRuntime("attn", cfg, mod.build(cfg, seed=0), native=False)
    assert not f32.compact()  # on XLA nothing to drop: the float32 state is what it serves


# The default backend's decisions a machine can make (`kernels.chosen`: decode steps, prefill
# chunks), forced here rather than read from this machine's cached measurement.
DECISIONS = {
    "xla": None,
    "kernels for both": {"decode": True, "prefill": True},
    "kernels for decode only": {"decode": True, "prefill": False},
    "kernels for prefill only": {"decode": False, "prefill": True},
}


@pytest.fixture(params=list(DECISIONS))
def native(request, monkeypatch):
    """The runtime's `native` argument with the auto decision `request.param` names in force:
    False for XLA, else None (auto)."""
    chosen = DECISIONS[request.param]
    if chosen is None:
        return False
    force_decision(monkeypatch, **chosen)
    return None


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
def test_compact_converts_array_by_array(storage, native):
    """compact() before any step (a module server's start) builds the serving copies one array
    at a time and releases each float32 array once converted: the copies equal those made from
    the whole tree, and no float32 array outlives its conversion (peak: about one copy). Where
    the kernels compute one shape class only, a float32 module keeps XLA's copy for the other:
    the parameters themselves, not a second float32 copy."""
    import weakref

    from flax import nnx

    from pathways import modules as mod

    cfg = _spec().modules["attn"]
    whole = ModuleRuntime("attn", cfg, mod.build(cfg, seed=0), weights=storage, native=native)
    expected = {n: whole.serving_for(prefill=n) for n in (False, True)}
    # The module's arrays held only by the runtime (as a module server's restored state is).
    state = nnx.state(mod.build(cfg, seed=0))
    rt = ModuleRuntime("attn", cfg, mod.from_state(cfg, state), weights=storage, native=native)
    refs = [weakref.ref(x) for x in jax.tree.leaves(state)]
    del state
    convert, kernels_alive = rt._serving_leaf, []

    def counting(path, x, native):  # float32 kernels alive as each array is converted
        kernels_alive.append(sum(1 for r in refs if r() is not None and r().ndim == 2))
        return convert(path, x, native)

    rt._serving_leaf = counting
    dropped = rt.compact()
    if dropped:  # the last array converted is the last float32 kernel left, if one at all
        assert kernels_alive and kernels_alive[-1] <= 1, kernels_alive
    for prefill in (False, True):
        got = rt.serving_for(prefill=prefill)
        assert jax.tree.structure(got) == jax.tree.structure(expected[prefill])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected[prefill])):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    alive = [r() for r in refs if r() is not None]
    if dropped:  # only arrays a serving copy holds as they are (norm scales) survive
        kept = {id(x) for n in (False, True) for x in jax.tree.leaves(rt.serving_for(n))}
        assert all(id(x) in kept for x in alive)
        assert sum(x.size for x in alive) < 0.1 * sum(x.size for x in jax.tree.leaves(rt.state))
    else:  # float32 served as it is (by XLA's dot, for every shape or one): the arrays are
        # the state and XLA's serving copy, no other float32 copy of them
        assert storage == "float32" and len(alive) == len(refs)
        originals = [id(r()) for r in refs]
        assert [id(x) for x in jax.tree.leaves(rt._state)] == originals
        assert [id(x) for x in jax.tree.leaves(rt._servings[False])] == originals
        if rt._native_for(False) or rt._native_for(True):  # and the packed copy, for the other
            assert set(rt._servings) == {False, True}
            packed = jax.tree.leaves(rt._servings[True])
            assert not {id(x) for x in packed if x.ndim == 3} & {id(x) for x in alive}


def test_bad_storage_is_refused():
    with pytest.raises(ValueError, match="weights must be one of float32, bfloat16, int8"):
        weights.check("float16")
    with pytest.raises(ValueError, match="weights must be one of"):
        LocalExecutor(_spec(), weights="int4")
