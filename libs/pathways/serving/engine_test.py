"""Engines pad what clients send to bucketed shapes: outputs as if unpadded, and a bounded
number of compiled programs whatever lengths and batch sizes arrive."""

from __future__ import annotations

import numpy as np

from pathways.modules import AttentionConfig, EmbeddingConfig
from pathways.serving.chain import ChainEngine
from pathways.serving.engine import ModuleEngine
from pathways.serving.limits import ProgramCap
from pathways.serving.sessions import SessionTable


def test_forward_of_any_shape_matches_the_unpadded_module_and_compiles_few_programs():
    # Odd sizes on purpose: nothing lines up with a bucket by chance.
    cfg = AttentionConfig(d_model=24, n_layers=1, n_heads=3, max_seq_len=64)
    eng = ModuleEngine("attn", cfg, None, slots=2)
    module = eng.rt.module()
    rng = np.random.default_rng(0)
    shapes = {(int(rng.integers(1, 9)), int(rng.integers(1, 65))) for _ in range(30)}
    before = eng.rt.forward._cache_size()
    for b, t in sorted(shapes):
        x = rng.standard_normal((b, t, 24)).astype(np.float32)
        got = eng.forward(x)
        pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
        assert got.shape == (b, t, 24)
        np.testing.assert_allclose(got, module(x, pos), rtol=1e-5, atol=1e-5)
    # Batch padded to 1, 2, 4 or 8 and length to 8, 16, 32 or 64: at most 16 programs.
    compiled = eng.rt.forward._cache_size() - before
    assert compiled <= 16 < len(shapes), (compiled, len(shapes))


def test_prefill_of_any_length_gives_the_unpadded_outputs_and_few_programs():
    """A server's step (a chain of its one module): every length padded to a bucket, the
    outputs cut back; a module without a cache compiles one program per padded length, not one
    per window (its program does not depend on it)."""
    cfg = EmbeddingConfig(vocab_size=11, d_model=8, max_seq_len=64)
    eng = ModuleEngine("embed", cfg, None, slots=1)
    chain = ChainEngine([eng])
    chain.programs = ProgramCap(100)
    s = SessionTable(capacity=1, ttl_s=60).open(1, 64, None)
    module = eng.rt.module()
    for t in (1, 5, 9, 19, 33, 64):
        for start in (0, 64 - t):
            x = (np.arange(t, dtype=np.int32)[None] * 7) % 11
            starts = np.array([start], np.int32)
            y, _ = chain.prefill(s, x, starts, np.array([t], np.int32), None, False)
            pos = start + np.arange(t, dtype=np.int32)[None]
            assert np.asarray(y).shape == (1, t, 8)
            np.testing.assert_allclose(np.asarray(y), module(x, pos), rtol=1e-6, atol=1e-6)
    assert len(chain.programs) == 4  # lengths 8, 16, 32, 64 whatever the positions


def test_the_slot_pool_grows_keeping_what_open_sessions_wrote_and_reuses_freed_slots():
    cfg = AttentionConfig(d_model=8, n_layers=2, n_heads=2, max_seq_len=16)
    eng = ModuleEngine("attn", cfg)
    assert eng.cache is None and eng.capacity == 0  # in-process: nothing until a session opens
    a = eng.take(2)
    np.testing.assert_array_equal(a, [0, 1])
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    pos = np.broadcast_to(np.arange(3, dtype=np.int32), (2, 3))
    eng.step(x, pos, a, window=16)
    written = np.asarray(eng.cache["k"])[:, :2].copy()
    assert np.abs(written[:, :, :3]).sum() > 0
    b = eng.take(3)  # grows from 2 to 5 slots
    np.testing.assert_array_equal(b, [2, 3, 4])
    assert eng.capacity == 5 and eng.cache["k"].shape[1] == 5
    np.testing.assert_array_equal(np.asarray(eng.cache["k"])[:, :2], written)
    eng.give(a)
    np.testing.assert_array_equal(eng.take(2), [0, 1])  # freed slots first, no growth
    assert eng.capacity == 5


def test_a_server_of_one_module_describes_that_module():
    """A server steps its module through a chain of one; Describe still shows the module's own
    config (what the gateway's AddModule rebuilds the module's config from), and the limits read
    its fields; a chain of several shows the chain's contract."""
    import json

    from pathways.config import to_dict
    from pathways.serving.server import _Ctx
    from pathways.serving.servicer import ModuleServicer
    from pathways.v1 import module_pb2

    cfg = AttentionConfig(d_model=8, n_layers=1, n_heads=2, max_seq_len=16)
    chain = ChainEngine([ModuleEngine("attn", cfg, None, slots=1)])
    assert chain.cfg == cfg
    svc = ModuleServicer(chain, SessionTable(capacity=1, ttl_s=60), 4, 0.001)
    svc.ready = True
    r = svc.Describe(module_pb2.DescribeRequest(), _Ctx())
    assert (r.name, r.kind) == ("attn", "attention")
    assert json.loads(r.config_json) == json.loads(json.dumps(to_dict(cfg)))
    two = ChainEngine(
        [ModuleEngine("a", cfg, None, slots=1), ModuleEngine("b", cfg, None, slots=1)]
    )
    assert two.cfg.modules == ("a", "b")
