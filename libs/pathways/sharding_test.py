"""Tensor-parallel modules on 8 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8,
set for this file in BUILD): a sharded pathway computes what the unsharded one does, and each
device holds its share of the weights and KV cache."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pathways import sharding
from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.modules import AttentionConfig
from pathways.sampling import SamplingParams
from pathways.serving.engine import ModuleEngine

if jax.device_count() < 8:
    pytest.skip(
        "needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (the BUILD sets it)",
        allow_module_level=True,
    )

MAX_LEN = 32


def _spec(vocab: int) -> spec_lib.PathwaySpec:
    # GPT-2 style lower stack, Llama style upper stack (rope, swiglu, 8 query / 4 kv heads).
    return spec_lib.from_dict(
        {
            "modules": {
                "embed": {
                    "kind": "embedding",
                    "vocab_size": vocab,
                    "d_model": 64,
                    "max_seq_len": MAX_LEN,
                    "init_std": 1.0,
                },
                "lower": {
                    "kind": "attention",
                    "d_model": 64,
                    "n_layers": 2,
                    "n_heads": 8,
                    "d_ff": 256,
                    "max_seq_len": MAX_LEN,
                    "init_std": 0.3,
                },
                "upper": {
                    "kind": "attention",
                    "d_model": 64,
                    "n_layers": 1,
                    "n_heads": 8,
                    "n_kv_heads": 4,
                    "d_ff": 128,
                    "max_seq_len": MAX_LEN,
                    "norm": "rmsnorm",
                    "mlp": "swiglu",
                    "positions": "rope",
                    "bias": False,
                    "init_std": 0.3,
                },
                "head": {"kind": "decoding", "d_model": 64, "vocab_size": vocab, "init_std": 0.3},
            },
            "pathways": {"p": ["embed", "lower", "upper", "head"]},
        }
    )


def _generate(ex, prompts, n=5):
    s = ex.open_session("p", [SamplingParams()] * len(prompts))
    r = ex.prefill(s, prompts, return_logits=True)
    tokens, logits = [r.tokens], [r.logits]
    for _ in range(n):
        r = ex.decode(s, r.tokens, return_logits=True)
        tokens.append(r.tokens)
        logits.append(r.logits)
    ex.close_session(s)
    return np.stack(tokens, 1), np.stack(logits, 1)


def placed(ex, module: str):
    return ex.runtimes[module].placement.shardings


@pytest.mark.parametrize(("vocab", "tp"), [(256, 8), (257, 4)])
def test_a_sharded_pathway_equals_the_unsharded_one(vocab, tp):
    """Prefill, decode (fused and per module), loss and gradients. 256 splits the embedding
    table and LM head by vocabulary; 257 does not divide, so they split by d_model."""
    spec = _spec(vocab)
    ref = LocalExecutor(spec, seed=3)
    states = {m: ref.state(m) for m in spec.modules}
    mesh = sharding.make_mesh(tp)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, n).tolist() for n in (7, 3)]
    want_tokens, want_logits = _generate(ref, prompts)
    for fuse in (True, False):
        ex = LocalExecutor(spec, states, mesh=mesh, fuse=fuse)
        got_tokens, got_logits = _generate(ex, prompts)
        np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(got_tokens, want_tokens)
    x = rng.integers(0, vocab, (2, 16)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    want_loss, want_grads = ref.loss_and_grads("p", x, y)
    loss, grads = ex.loss_and_grads("p", x, y)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    for m in spec.modules:
        for g, w in zip(jax.tree.leaves(grads[m]), jax.tree.leaves(want_grads[m])):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)

    # KV caches split by kv head where the heads divide (lower: 8; upper: 4, so not at tp=8).
    for m, kv_heads in (("lower", 8), ("upper", 4)):
        k = ex.engines[m].cache["k"]  # a jitted step's output may drop trailing Nones
        spec_k = tuple(k.sharding.spec) + (None,) * (k.ndim - len(k.sharding.spec))
        split = kv_heads % tp == 0
        assert spec_k == ((None, None, None, "tp", None) if split else (None,) * 5), (m, spec_k)
        assert k.sharding.is_fully_replicated != split

    # Each device holds its share: total / tp for what splits, plus what is replicated.
    for m in spec.modules:
        state = ex.state(m)
        total = sum(int(a.nbytes) for a in jax.tree.leaves(state))
        replicated = sum(
            int(a.nbytes)
            for a, where in zip(jax.tree.leaves(state), jax.tree.leaves(placed(ex, m)))
            if where.is_fully_replicated
        )
        per_device = sharding.bytes_per_device(state)
        assert len(per_device) == tp
        for held in per_device.values():
            assert held == pytest.approx(replicated + (total - replicated) / tp, rel=1e-6), m
        assert replicated < total / 4, (m, replicated, total)  # norms and a few biases only


def test_a_cache_or_weight_that_does_not_divide_is_replicated_and_said_so():
    # 2 kv heads on 8 devices: keys/values cannot split by head.
    cfg = AttentionConfig(d_model=64, n_layers=1, n_heads=8, n_kv_heads=2, max_seq_len=16)
    eng = ModuleEngine("attn", cfg, mesh=sharding.make_mesh(8))
    eng.take(1)
    assert eng.cache["k"].sharding.is_fully_replicated
    cfg = AttentionConfig(d_model=64, n_layers=1, n_heads=8, d_ff=100, max_seq_len=16)
    eng = ModuleEngine("attn", cfg, mesh=sharding.make_mesh(8))
    notes = eng.rt.placement.notes
    assert any("attn/blocks/0/mlp/fc/kernel [64, 100]: replicated" in n for n in notes), notes
    assert any("mlp/down/kernel [100, 64]" in n for n in notes), notes


def test_mesh_settings_are_checked():
    assert sharding.parse_mesh("tp=4") == 4
    for bad in ("tp=0", "dp=2", "tp=x", "4", ""):
        with pytest.raises(ValueError, match="mesh must look like tp=N"):
            sharding.parse_mesh(bad)
    with pytest.raises(ValueError, match="mesh tp=16 needs 16 devices; 8 cpu"):
        sharding.make_mesh(16)


def test_sharded_module_servers_equal_the_local_executor(tmp_path):
    """Every module its own server with --mesh tp=4 (they inherit this process's 8 host
    devices): generation through them equals the unsharded local executor."""
    from pathways import checkpoint as ckpt
    from pathways import tokenizers
    from pathways.deploy import launcher
    from pathways.executor.remote import RemoteExecutor
    from pathways.serving.settings import ModuleServerSettings

    spec = _spec(256)
    ref = LocalExecutor(spec, seed=3)
    ckpt.save_spec(tmp_path, spec, tokenizers.ByteTokenizer())
    for m in spec.modules:
        ckpt.save_module(tmp_path, m, ref.state(m))
    prompts = [[5, 9, 200, 17, 3, 1, 2], [42, 7, 8]]
    want_tokens, want_logits = _generate(ref, prompts)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PATHWAYS_CPU_THREADS": "1"}
    with launcher.Fleet(
        str(tmp_path),
        list(spec.modules),
        gateway=False,
        env=env,
        log=str(tmp_path / "logs"),
        module_args=["--mesh", "tp=4"],
    ) as fleet:
        ex = RemoteExecutor(spec, fleet.endpoints)
        got_tokens, got_logits = _generate(ex, prompts)
        ex.close()
    for m in spec.modules:  # each server says how it split its module
        text = next((tmp_path / "logs").glob(f"*{m}*.log")).read_text()
        assert f"module {m}: split over tp=4" in text, text[-2000:]
    np.testing.assert_array_equal(got_tokens, want_tokens)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)

    # A mesh setting is checked before anything loads.
    for bad, message in (("tp=x", "mesh must look like tp=N"), ("tp=2", "int8 is not supported")):
        with pytest.raises(ValueError, match=message):
            ModuleServerSettings("c", "m", insecure=True, mesh=bad, weights="int8")
