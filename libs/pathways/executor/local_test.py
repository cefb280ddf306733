"""Tests for the local executor: incremental decoding against a full forward, limits, loss/grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathways import backends, kernels, runtime
from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.kernels.testing import force_decision
from pathways.modules.attention import empty_cache
from pathways.sampling import SamplingParams, sample

MAX_LEN = 24
# Larger-than-default init scales so logits differ by O(1) between positions and tokens: a cache
# bug then moves them far past the tolerance instead of hiding under a near-uniform softmax.
SPEC = {
    "modules": {
        "embed": {
            "kind": "embedding",
            "vocab_size": 37,
            "d_model": 24,
            "max_seq_len": MAX_LEN,
            "init_std": 1.0,
        },
        # GPT-2 style: layernorm, GELU, learned positions from the embedding.
        "attn-a": {
            "kind": "attention",
            "d_model": 24,
            "n_layers": 3,
            "n_heads": 3,
            "max_seq_len": MAX_LEN,
            "init_std": 0.3,
        },
        # Llama style: rmsnorm, SwiGLU, RoPE, grouped-query attention (6 query, 2 kv heads).
        "attn-b": {
            "kind": "attention",
            "d_model": 24,
            "n_layers": 2,
            "n_heads": 6,
            "n_kv_heads": 2,
            "max_seq_len": MAX_LEN,
            "norm": "rmsnorm",
            "mlp": "swiglu",
            "positions": "rope",
            "bias": False,
            "init_std": 0.3,
        },
        "head": {"kind": "decoding", "d_model": 24, "vocab_size": 37, "init_std": 0.3},
    },
    "pathways": {
        "full": ["embed", "attn-a", "attn-b", "head"],
        "shallow": ["embed", "attn-b", "head"],
    },
}


# Every test uses batches of B rows and prompts padded to 8 (or T-token forwards), so the
# jitted programs compile once for the whole file.
B, T = 3, 12


@pytest.fixture(scope="module")
def ex():
    return LocalExecutor(spec_lib.from_dict(SPEC), seed=1)


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 37, n).tolist() for n in (5, 1, 8)]  # different lengths, one of 1


def _tokens(seed):
    return np.random.default_rng(seed).integers(0, 37, (B, T)).astype(np.int32)


def test_prefill_and_decode_logits_equal_full_forward(ex):
    prompts, steps = _prompts(), 4
    s = ex.open_session("full", [SamplingParams()] * len(prompts))
    r = ex.prefill(s, prompts, return_logits=True)
    logits, seqs = [r.logits], [list(p) for p in prompts]
    np.testing.assert_array_equal(r.tokens, r.logits.argmax(-1))  # greedy samples the logits
    for _ in range(steps):
        for seq, t in zip(seqs, r.tokens):
            seq.append(int(t))
        r = ex.decode(s, r.tokens, return_logits=True)
        logits.append(r.logits)
    ex.close_session(s)
    assert s.lengths.tolist() == [len(p) + steps for p in prompts]

    # Reference: one stateless forward over the right-padded sequences (causality keeps the
    # padding out of the real positions).
    batch = _tokens(0)
    for i, q in enumerate(seqs):
        batch[i, : len(q)] = q
    full = ex.forward("full", batch)
    assert full.shape == (B, T, 37)
    for i, p in enumerate(prompts):
        for j in range(steps + 1):
            np.testing.assert_allclose(logits[j][i], full[i, len(p) - 1 + j], atol=1e-4)


def test_sessions_are_independent_and_reproducible(ex):
    params = [
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(temperature=1.0, seed=4),
        SamplingParams(temperature=1.0, seed=3),
    ]
    prompt = _prompts()[2]

    def run():
        s = ex.open_session("full", params)
        r = ex.prefill(s, [prompt] * B, return_logits=True)
        toks = []
        for step in range(8):
            # Step j's draw is sample(its logits) under key fold_in(seed, j): replayable.
            expected = sample(r.logits, *s.sampling.as_tuple(), np.full(B, step, np.int32))
            np.testing.assert_array_equal(r.tokens, expected)
            toks.append(r.tokens)
            if step < 7:
                r = ex.decode(s, r.tokens, return_logits=True)
        ex.close_session(s)
        return np.stack(toks, axis=1)  # (B, 8)

    first = run()
    np.testing.assert_array_equal(first[0], first[2])  # same prompt, same seed
    assert (first[0] != first[1]).any()  # another seed
    other = ex.open_session("full", [SamplingParams()] * B)  # interleaved, unrelated session
    ex.prefill(other, _prompts())
    np.testing.assert_array_equal(run(), first)
    ex.close_session(other)


def test_forward_is_causal(ex):
    tokens = _tokens(1)
    changed = tokens.copy()
    changed[:, 5] = (tokens[:, 5] + 1) % 37
    a, b = ex.forward("full", tokens), ex.forward("full", changed)
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-5)
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-2


def test_pathways_share_module_parameters(ex):
    assert ex.chain("full")[2] is ex.chain("shallow")[1] is ex.runtimes["attn-b"]
    assert [rt.name for rt in ex.chain("shallow")] == ["embed", "attn-b", "head"]


def test_max_sequence_length_exceeded(ex):
    s = ex.open_session("full", [SamplingParams()] * B)
    with pytest.raises(
        ValueError,
        match=f"max sequence length exceeded: 25 tokens > pathway " f"'full' max_seq_len {MAX_LEN}",
    ):
        ex.prefill(s, [[1] * 3, [2] * (MAX_LEN + 1), [3]])
    # Prefill in chunks (each continues where the last stopped) up to MAX_LEN - 1 in row 0.
    ex.prefill(s, [[1] * 8, [2] * 8, [3]])
    ex.prefill(s, [[1] * 8, [2], [3]])
    r = ex.prefill(s, [[1] * 7, [2], [3]])
    assert s.lengths.tolist() == [MAX_LEN - 1, 10, 3]
    r = ex.decode(s, r.tokens)  # fills row 0 to exactly MAX_LEN
    with pytest.raises(ValueError, match=f"{MAX_LEN + 1} tokens > pathway 'full'"):
        ex.decode(s, r.tokens)
    ex.close_session(s)


def test_session_errors(ex):
    with pytest.raises(ValueError, match="at least one sequence"):
        ex.open_session("full", [])
    with pytest.raises(spec_lib.SpecError, match="unknown pathway 'deep'"):
        ex.open_session("deep", [SamplingParams()])
    s = ex.open_session("full", [SamplingParams()] * B)
    with pytest.raises(ValueError, match="prefill got 1 prompts for a session of 3"):
        ex.prefill(s, [[1]])
    with pytest.raises(ValueError, match="at least one token"):
        ex.prefill(s, [[1], [], [2]])
    ex.close_session(s)
    with pytest.raises(KeyError, match="unknown session"):
        ex.prefill(s, [[1], [2], [3]])


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_and_per_module_grads(ex):
    inputs, targets = _tokens(2), _tokens(3)
    loss, grads = ex.loss_and_grads("shallow", inputs, targets)
    logp = _log_softmax(ex.forward("shallow", inputs).astype(np.float64))
    ref = -np.take_along_axis(logp, targets[..., None], -1).mean()
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
    assert ex.loss("shallow", inputs, targets) == pytest.approx(float(loss), rel=1e-6)
    # One gradient per module on the pathway, shaped like its parameters; attn-a is not on it.
    assert list(grads) == ["embed", "attn-b", "head"]

    for name, g in grads.items():
        assert jax.tree.structure(g) == jax.tree.structure(ex.state(name))
        assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g)) > 0


def test_set_state_checks_structure(ex):
    with pytest.raises(ValueError, match="module 'head': parameters do not match"):
        ex.set_state("head", ex.state("embed"))


def test_states_given_at_construction_are_used(ex):
    other = LocalExecutor(spec_lib.from_dict(SPEC), states={"head": ex.state("head")}, seed=7)

    same = jax.tree.map(
        lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
        other.state("head"),
        ex.state("head"),
    )
    assert all(jax.tree.leaves(same))
    differ = jax.tree.map(
        lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
        other.state("embed"),
        ex.state("embed"),
    )
    assert not all(jax.tree.leaves(differ))


@pytest.fixture
def concrete_builds(monkeypatch):
    """The configs whose module gets built with real (random) parameters: `modules.build`
    outside `modules.abstract`'s shape-only trace."""
    from pathways import modules as mod

    built, build = [], mod.build

    def counting(cfg, seed=0):
        module = build(cfg, seed)
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(nnx.state(module))):
            built.append(cfg)
        return module

    monkeypatch.setattr(mod, "build", counting)  # abstract() calls it too, under eval_shape
    return built


def test_states_given_at_construction_are_not_initialised(ex, concrete_builds):
    spec = spec_lib.from_dict(SPEC)
    other = LocalExecutor(spec, states={"head": ex.state("head")}, seed=7)
    assert concrete_builds == [spec.modules[m] for m in ("embed", "attn-a", "attn-b")]
    assert other.state("head") is not None
    with pytest.raises(ValueError, match="module 'head': parameters do not match"):
        LocalExecutor(spec, states={"head": ex.state("embed")})


def test_checkpoint_given_at_construction_is_restored_exactly_without_init(
    ex, tmp_path, concrete_builds
):
    """LocalExecutor(checkpoint=) restores each saved module into its abstract shapes (no
    random parameters built first): the weights are the saved ones bit for bit, a module the
    checkpoint lacks is initialised from the seed as before, and sessions compute the same."""
    from pathways import checkpoint as ckpt

    spec = spec_lib.from_dict(SPEC)
    saved = ("embed", "attn-a", "attn-b")
    for name in saved:
        ckpt.save_module(tmp_path, name, ex.state(name))
    concrete_builds.clear()
    restored = LocalExecutor(spec, checkpoint=tmp_path, seed=1)  # the fixture's seed
    assert concrete_builds == [spec.modules["head"]]  # not saved: the only module initialised
    for name in (*saved, "head"):
        got, want = restored.state(name), ex.state(name)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    prompts = _prompts()
    np.testing.assert_array_equal(_session_logits(restored, prompts), _session_logits(ex, prompts))


def _session_logits(ex, prompts, steps=3):
    s = ex.open_session("full", [SamplingParams()] * len(prompts))
    r = ex.prefill(s, prompts, return_logits=True)
    out = [r.logits]
    for _ in range(steps):
        r = ex.decode(s, r.tokens, return_logits=True)
        out.append(r.logits)
    ex.close_session(s)
    return np.stack(out)


def test_bfloat16_weights_are_the_rounded_float32_weights(ex):
    """Sessions with weights="bfloat16" compute with bf16-rounded weights: decode steps in
    float32 arithmetic, so the native kernel (bf16 panels) and XLA (rounded float32 kernels)
    agree; prefill chunks of more than 8 rows multiply on AMX tiles where the CPU has them
    (activations rounded to bfloat16 too, as in any bfloat16 GEMM), which moves the logits by
    about the same amount as the weights' rounding."""
    states = {name: ex.state(name) for name in ex.runtimes}
    spec = spec_lib.from_dict(SPEC)
    half = LocalExecutor(spec, states, weights="bfloat16")
    half_xla = LocalExecutor(spec, states, weights="bfloat16", native=False)
    short = [[5, 17, 3]]  # one row padded to 8 positions: no tiles anywhere
    np.testing.assert_allclose(
        _session_logits(half, short), _session_logits(half_xla, short), atol=1e-4
    )
    prompts = _prompts()
    got, ref = _session_logits(half, prompts), _session_logits(half_xla, prompts)
    np.testing.assert_allclose(got, ref, atol=0.1 if kernels.tiles_available() else 1e-4)
    full = _session_logits(ex, prompts)
    assert 1e-4 < np.abs(full - ref).max() < 0.5
    with pytest.raises(ValueError, match="float16"):
        LocalExecutor(spec, weights="float16")


def test_sessions_use_parameters_set_after_they_were_packed():
    a = LocalExecutor(spec_lib.from_dict(SPEC), seed=1)
    b = LocalExecutor(spec_lib.from_dict(SPEC), seed=2)
    prompts = _prompts()
    before = _session_logits(a, prompts, steps=1)  # packs a's serving weights
    for name in a.runtimes:
        a.set_state(name, b.state(name))
    np.testing.assert_allclose(
        _session_logits(a, prompts, steps=1), _session_logits(b, prompts, steps=1), atol=1e-5
    )
    assert np.abs(before - _session_logits(b, prompts, steps=1)).max() > 1e-2


def test_serve_paths_take_the_serving_parameters_flat():
    """step (without and with a cache) and serve_head compute what the modules do eagerly with
    serving_state, and the flat leaves are built once per serving_state (again after
    set_state)."""
    ex = LocalExecutor(spec_lib.from_dict(SPEC), seed=3)
    embed, attn, head = ex.runtimes["embed"], ex.runtimes["attn-a"], ex.runtimes["head"]

    def eager(rt):
        return nnx.merge(rt.graphdef, rt.serving_state)

    tokens = np.array([[3, 1, 4, 1, 5]], np.int32)
    pos = np.arange(5, dtype=np.int32)[None]
    x, none = embed.step(tokens, pos)
    assert none is None
    np.testing.assert_allclose(x, eager(embed)(tokens, pos), atol=1e-5)
    slots = np.zeros(1, np.int32)
    y, _ = attn.step(x, pos, empty_cache(attn.cfg, 1), slots, window=8)
    with backends.using(attn.native_attention):
        y_ref, _ = eager(attn).forward_cached(x, pos, empty_cache(attn.cfg, 1), slots, 8)
    np.testing.assert_allclose(y, y_ref, atol=1e-4)
    greedy = (np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32))
    tokens_out, logits = head.serve_head(
        y, np.array([4], np.int32), *greedy, np.zeros(1, np.uint32), np.zeros(1, np.int32)
    )
    np.testing.assert_allclose(logits, eager(head)(np.asarray(y)[:, 4]), atol=1e-4)
    assert int(tokens_out[0]) == int(np.argmax(logits[0]))
    leaves = attn._serving_flat()[0]
    assert attn._serving_flat()[0] is leaves  # not flattened again per call
    ex.set_state("attn-a", LocalExecutor(spec_lib.from_dict(SPEC), seed=4).state("attn-a"))
    assert attn._serving_flat()[0] is not leaves


def test_small_parameters_travel_packed_and_come_back_exact():
    """The float32 vectors among a module's serving leaves go into the jitted programs as one
    array; unpacked inside, every leaf is the same array in the same place."""
    ex = LocalExecutor(spec_lib.from_dict(SPEC), seed=3)
    attn = ex.runtimes["attn-a"]
    full, _ = jax.tree.flatten(attn.serving_state)
    packed, layout = runtime._pack_small(full)
    vectors = [a for a in full if a.ndim == 1]
    assert len(packed) == len(full) - len(vectors) + 1 and packed[-1].ndim == 1
    assert [a.shape for a in packed[:-1]] == [a.shape for a in full if a.ndim != 1]
    back = jax.jit(lambda ps: runtime._unpack_small(ps, layout))(packed)
    assert len(back) == len(full)
    for a, b in zip(full, back):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert len(attn._serving_flat()[0]) == len(packed)  # what the serve paths pass
    # Distinct values (the module's biases start as zeros): order and sizes must come back.
    rng = np.random.default_rng(0)
    mixed = [
        rng.standard_normal((3, 2)).astype(np.float32),
        rng.standard_normal(5).astype(np.float32),
        np.arange(5, dtype=np.int32),  # not float32: stays a leaf of its own
        rng.standard_normal(7).astype(np.float32),
        rng.standard_normal((4, 4)).astype(jax.numpy.bfloat16),
        rng.standard_normal(1).astype(np.float32),
    ]
    packed, layout = runtime._pack_small([jax.numpy.asarray(a) for a in mixed])
    assert len(packed) == 4 and packed[-1].shape == (13,)
    for a, b in zip(mixed, jax.jit(lambda ps: runtime._unpack_small(ps, layout))(packed)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # Nothing to pack (at most one vector, or none): the leaves go as they are.
    two = [np.ones((2, 3), np.float32), np.ones(4, np.float32)]
    assert runtime._pack_small(two) == (two, None)
    assert runtime._unpack_small(two, None) is two


@pytest.mark.parametrize("decode_only", [False, True], ids=["kernels for both", "decode only"])
def test_compact_keeps_one_exact_copy_of_the_weights(ex, monkeypatch, decode_only):
    """Where the kernels compute every shape, compact() drops the float32 parameters for their
    packed copy; where they compute decode steps only, XLA's copy for prefill chunks is the
    parameters themselves: nothing to drop, and nothing copied."""
    spec = spec_lib.from_dict(SPEC)
    states = {name: ex.state(name) for name in ex.runtimes}
    force_decision(monkeypatch, decode=True, prefill=not decode_only)
    other = LocalExecutor(spec, states)
    prompts = _prompts()
    before = _session_logits(other, prompts, steps=1)
    rt = other.runtimes["attn-a"]
    if decode_only:
        held = [id(x) for x in jax.tree.leaves(rt.state)]
        assert not rt.compact()
        assert [id(x) for x in jax.tree.leaves(rt.state)] == held
        assert [id(x) for x in jax.tree.leaves(rt.serving_for(prefill=True))] == held
        np.testing.assert_array_equal(_session_logits(other, prompts, steps=1), before)
        return
    assert rt.compact()
    assert rt._state is None
    np.testing.assert_array_equal(_session_logits(other, prompts, steps=1), before)
    for a, b in zip(jax.tree.leaves(rt.state), jax.tree.leaves(states["attn-a"])):  # rebuilt
        np.testing.assert_array_equal(a, b)
    assert not other.runtimes["embed"].compact()  # no linear kernels: nothing to drop
    half = LocalExecutor(spec, states, weights="bfloat16")
    # A bfloat16 copy is all a serving process keeps (pathways.weights): state becomes what it
    # holds, the bfloat16-rounded weights.
    assert half.runtimes["attn-a"].compact()
    for a, b in zip(
        jax.tree.leaves(half.runtimes["attn-a"].state), jax.tree.leaves(states["attn-a"])
    ):
        b = np.asarray(b)
        rounded = np.asarray(jnp.asarray(b).astype(jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_array_equal(np.asarray(a), rounded if b.ndim == 2 else b)
