"""Tests for the native CPU kernels: the matmul over packed weights, attention against the KV
cache, packing a module's state for serving, and how PATHWAYS_KERNELS picks and builds them."""

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathways import kernels, modules
from pathways.modules.layers import attend

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _bf16(x):  # x rounded to bfloat16, as float32
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


@pytest.fixture(scope="module")
def native():
    """Skips where the kernels cannot be built; fails where they should build and do not (a
    compile error must not pass as a skip)."""
    if kernels.mode() == "xla":
        pytest.skip("PATHWAYS_KERNELS=xla: set it to native to test them")
    if jax.default_backend() != "cpu":
        pytest.skip(f"CPU kernels; JAX computes on {jax.default_backend()} here")
    try:
        kernels.build._compiler()
    except kernels.KernelError as e:
        pytest.skip(f"native kernels cannot be built here: {e}")
    if kernels.mode() == "auto" and kernels.build._lib is not None and not kernels.available():
        pytest.skip(
            "PATHWAYS_KERNELS=auto measured them slower here: set it to native to test them"
        )
    assert kernels.available(), "a C++ compiler is present but the native kernels did not build"


# ---- matmul ----------------------------------------------------------------------------------
def _packed_reference(w, weights):
    """Packs w; returns (packed, the float64 weights the kernel should multiply by)."""
    packed = kernels.pack(w, weights)
    used = w if weights == "float32" else kernels.unpack(packed, w.shape[1])
    return packed, np.asarray(used, np.float64)


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("weights", kernels.WEIGHTS)
# 3: AVX2's float32 weights as memory operands; 4-8: AVX2's passes over k-blocks (several
# passes per panel); > 8: several row groups; 50: more than 6 groups,
# bfloat16 panels widened once (matmul.cc's kWidenGroups)
@pytest.mark.parametrize("m", [1, 3, 4, 6, 8, 9, 20, 50])
@pytest.mark.parametrize("k, n", [(7, 1), (72, 33), (7, 100)])
def test_matmul_matches_float64_reference(weights, m, k, n):
    x = _normal(0, (m, k))
    packed, w = _packed_reference(_normal(1, (k, n)), weights)
    y = kernels.matmul(x, packed, n)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("weights", kernels.WEIGHTS)
def test_matmul_leading_dims_empty_inputs_and_jit(weights):
    packed, w = _packed_reference(_normal(1, (72, 33)), weights)
    x = _normal(0, (2, 5, 72))  # (B, T, K): 10 rows
    jitted = jax.jit(kernels.matmul, static_argnums=2)
    for fn in (kernels.matmul, jitted):
        y = fn(x, packed, 33)
        assert y.shape == (2, 5, 33)
        np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)
        for shape in [(0, 72), (2, 0, 72)]:
            empty = fn(np.zeros(shape, np.float32), packed, 33)
            assert empty.shape == (*shape[:-1], 33) and empty.dtype == jnp.float32


@pytest.mark.parametrize("n", [1, 32, 33, 100])
def test_pack_unpack_round_trip(n):
    w = _normal(0, (7, n))
    packed = kernels.pack(w)
    panels = -(-n // 32)
    assert packed.shape == (panels, 7, 32) and packed.dtype == jnp.float32
    np.testing.assert_array_equal(kernels.unpack(packed, n), w)
    np.testing.assert_array_equal(np.asarray(kernels.unpack(packed, panels * 32))[:, n:], 0)
    bf16 = kernels.pack(w, "bfloat16")
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(kernels.unpack(bf16, n), _bf16(w))


def test_matmul_rejects_mismatched_shapes():
    packed = kernels.pack(np.zeros((7, 33), np.float32))
    with pytest.raises(ValueError, match=r"x \(3, 5\) .* \(2, 7, 32\) for 33 outputs"):
        kernels.matmul(np.zeros((3, 5), np.float32), packed, 33)
    with pytest.raises(ValueError, match=r"\(2, 7, 32\) for 65 outputs"):
        kernels.matmul(np.zeros((3, 7), np.float32), packed, 65)


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("m, k, n", [(9, 7, 1), (20, 72, 33), (40, 100, 70), (96, 64, 130)])
def test_tiles_matmul_is_a_bfloat16_gemm(m, k, n):
    """tiles=True with bfloat16 weights (prefill): x rounded to bfloat16, float32 sums, on AMX
    where the CPU has it; elsewhere exactly the float32-activation path."""
    x = _normal(0, (m, k))
    packed, w = _packed_reference(_normal(1, (k, n)), "bfloat16")
    y = np.asarray(kernels.matmul(x, packed, n, tiles=True))
    assert y.shape == (m, n)
    if not kernels.tiles_available():
        np.testing.assert_array_equal(y, kernels.matmul(x, packed, n))
        pytest.skip("no AMX tiles here: checked only the fallback")
    np.testing.assert_allclose(y, _bf16(x).astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
    assert np.abs(y - x.astype(np.float64) @ w).max() > 1e-3  # x really was rounded


@pytest.mark.usefixtures("native")
def test_tiles_matmul_keeps_nan_and_inf():
    x = _normal(0, (20, 40))
    x[3, 5], x[7, 0], x[11, 39] = np.nan, np.inf, -np.inf
    x[15, 9] = np.array([0x7FFFFFFF], np.uint32).view(np.float32)[0]  # a NaN rounding would wrap
    packed = kernels.pack(np.abs(_normal(1, (40, 33))) + 0.1, "bfloat16")  # all weights > 0
    y = np.asarray(kernels.matmul(x, packed, 33, tiles=True))
    assert np.isnan(y[3]).all() and np.isnan(y[15]).all()
    assert (y[7] == np.inf).all() and (y[11] == -np.inf).all()
    assert np.isfinite(np.delete(y, [3, 7, 11, 15], axis=0)).all()


@pytest.mark.usefixtures("native")
def test_tiles_only_for_bfloat16_weights_and_more_than_eight_rows():
    x = _normal(0, (20, 72))
    f32 = kernels.pack(_normal(1, (72, 33)))
    np.testing.assert_array_equal(
        kernels.matmul(x, f32, 33, tiles=True), kernels.matmul(x, f32, 33)
    )
    bf16 = kernels.pack(_normal(1, (72, 33)), "bfloat16")
    np.testing.assert_array_equal(  # a decode batch of 8 rows keeps float32 activations
        kernels.matmul(x[:8], bf16, 33, tiles=True), kernels.matmul(x[:8], bf16, 33)
    )


@pytest.mark.usefixtures("native")
def test_amx_off_keeps_float32_activations():
    code = """
        import numpy as np
        from pathways import kernels
        rng = np.random.default_rng(0)
        x = rng.standard_normal((20, 72), dtype=np.float32)
        packed = kernels.pack(rng.standard_normal((72, 33), dtype=np.float32), "bfloat16")
        assert not kernels.tiles_available()
        same = np.array_equal(
            kernels.matmul(x, packed, 33, tiles=True), kernels.matmul(x, packed, 33)
        )
        print("same" if same else "differ")
    """
    done = _python(code, PATHWAYS_KERNELS="native", PATHWAYS_AMX="off")
    assert done.stdout.strip() == "same"
    bad = """
        from pathways import kernels
        try:
            kernels.tiles_available()
        except kernels.KernelError as e:
            print(e)
    """
    done = _python(bad, PATHWAYS_KERNELS="native", PATHWAYS_AMX="maybe")
    assert done.stdout.strip() == "PATHWAYS_AMX must be one of auto, off; got 'maybe'"


@pytest.mark.usefixtures("native")
def test_dense_multiplies_on_tiles_over_sequences_only():
    """layers.Dense: a prefill chunk (T > 1) may use the tiles; decode steps (T = 1) never do,
    whatever the batch."""
    layer = modules.layers.dense(72, 33, bias=False, std=0.5, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    packed_layer = nnx.merge(graphdef, kernels.pack_state(state, "bfloat16"))
    kernel = packed_layer.kernel[...]
    seq = _normal(2, (1, 20, 72))
    np.testing.assert_array_equal(packed_layer(seq), kernels.matmul(seq, kernel, 33, tiles=True))
    steps = _normal(3, (20, 1, 72))  # 20 sessions' decode steps batched
    np.testing.assert_array_equal(packed_layer(steps), kernels.matmul(steps, kernel, 33))


# ---- attention against the cache -------------------------------------------------------------
L, S, T_MAX, LAYER, WINDOW = 2, 3, 8, 1, 6
SLOTS = np.array([2, 0], np.int32)  # not contiguous; slot 1 is never written
POSITIONS = {  # T_MAX marks padding (not written); position 6 >= WINDOW is written, not attended
    1: [[5], [T_MAX]],
    4: [[2, 3, 4, 6], [0, 1, 2, T_MAX]],
}


def _reference(q, k, v, positions, slots, cache_k, cache_v):
    """Attention.forward_cached's XLA branch for one layer."""
    rows = slots[:, None]
    cache_k, cache_v = jnp.asarray(cache_k), jnp.asarray(cache_v)
    cache_k = cache_k.at[LAYER, rows, positions].set(k, mode="drop")
    cache_v = cache_v.at[LAYER, rows, positions].set(v, mode="drop")
    mask = jnp.arange(WINDOW)[None, None, :] <= positions[:, :, None]
    out = attend(q, cache_k[LAYER, slots, :WINDOW], cache_v[LAYER, slots, :WINDOW], mask)
    return out, cache_k, cache_v


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit-donated"])
@pytest.mark.parametrize("h", [12, 16, 20])  # Dot's scalar, vector, and vector + tail paths
@pytest.mark.parametrize("t", [1, 4])
def test_attend_cached_matches_xla_reference(t, h, jit):
    b, n, kv = 2, 6, 2  # grouped-query: 3 query heads per kv head
    q, k, v = _normal(0, (b, t, n, h)), _normal(1, (b, t, kv, h)), _normal(2, (b, t, kv, h))
    positions = np.array(POSITIONS[t], np.int32)
    # Earlier tokens everywhere, so that reads of unwritten positions and stray writes show.
    cache_k, cache_v = _normal(3, (L, S, T_MAX, kv, h)), _normal(4, (L, S, T_MAX, kv, h))
    out_ref, k_ref, v_ref = _reference(q, k, v, positions, SLOTS, cache_k, cache_v)

    fn = functools.partial(kernels.attend_cached, layer=LAYER, window=WINDOW)
    if jit:
        fn = jax.jit(fn, donate_argnums=(5, 6))
    out, k_out, v_out = fn(q, k, v, positions, SLOTS, jnp.array(cache_k), jnp.array(cache_v))

    assert out.shape == (b, t, n * h)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(k_out, k_ref)
    np.testing.assert_array_equal(v_out, v_ref)
    # Exactly the chunk's non-padding (layer, slot, position)s changed, to this chunk's k and v.
    written = np.zeros((L, S, T_MAX), bool)
    for row, slot in enumerate(SLOTS):
        for step, p in enumerate(positions[row]):
            if p < T_MAX:
                written[LAYER, slot, p] = True
                np.testing.assert_array_equal(k_out[LAYER, slot, p], k[row, step])
                np.testing.assert_array_equal(v_out[LAYER, slot, p], v[row, step])
    np.testing.assert_array_equal((np.asarray(k_out) != cache_k).any(axis=(3, 4)), written)
    np.testing.assert_array_equal((np.asarray(v_out) != cache_v).any(axis=(3, 4)), written)


@pytest.mark.usefixtures("native")
def test_attend_cached_split_over_a_two_thread_pool():
    """With two threads in XLA's pool a step with enough keys to read has its (row, kv head)
    pairs split between them, chunks starting and ending inside a row's heads: the same
    outputs and cache as XLA's ops."""
    code = """
        from pathways import cpu
        assert cpu.limit_threads(2) == 2  # before JAX's first computation
        import jax.numpy as jnp
        import numpy as np
        from pathways import kernels
        from pathways.modules.layers import attend
        assert kernels.available()
        rng = np.random.default_rng(0)
        # 24 (row, kv head) pairs in 8 chunks, ending inside rows of 4 kv heads; ~1,200
        # positions of keys (a step reading fewer than 64K floats stays on one thread)
        b, t, n, kv, h, t_max, window = 3, 2, 8, 4, 64, 300, 260
        q = rng.standard_normal((b, t, n, h), dtype=np.float32)
        k, v = (rng.standard_normal((b, t, kv, h), dtype=np.float32) for _ in range(2))
        ck, cv = (rng.standard_normal((2, 4, t_max, kv, h), dtype=np.float32) for _ in range(2))
        positions = np.array([[100, 101], [250, t_max], [259, 260]], np.int32)  # padding; unseen
        slots = np.array([2, 0, 3], np.int32)
        out, k_out, v_out = kernels.attend_cached(
            q, k, v, positions, slots, jnp.array(ck), jnp.array(cv), layer=1, window=window
        )
        k_ref = jnp.asarray(ck).at[1, slots[:, None], positions].set(k, mode="drop")
        v_ref = jnp.asarray(cv).at[1, slots[:, None], positions].set(v, mode="drop")
        mask = np.arange(window)[None, None, :] <= positions[:, :, None]
        ref = attend(q, k_ref[1, slots, :window], v_ref[1, slots, :window], mask)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(k_out, k_ref)
        np.testing.assert_array_equal(v_out, v_ref)
        print("ok")
    """
    assert _python(code, PATHWAYS_KERNELS="native").stdout.strip() == "ok"


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize(
    "slot, position, window, message",
    [
        (S, 0, T_MAX, "slot out of range"),
        (-1, 0, T_MAX, "slot out of range"),
        (0, -1, T_MAX, "position out of range"),
        (0, 0, T_MAX + 1, "layer or window out of range"),
    ],
)
def test_attend_cached_rejects_out_of_range_arguments(slot, position, window, message):
    q, k, cache = np.zeros((1, 1, 2, 4)), np.zeros((1, 1, 2, 4)), jnp.zeros((1, S, T_MAX, 2, 4))
    positions, slots = np.array([[position]], np.int32), np.array([slot], np.int32)
    with pytest.raises(jax.errors.JaxRuntimeError, match=message):
        out = kernels.attend_cached(q, k, k, positions, slots, cache, cache, layer=0, window=window)
        jax.block_until_ready(out)


# ---- serving state ---------------------------------------------------------------------------
def _decoding():
    """(graphdef, state) of a small decoding module: norm scale/bias and a (12, 37) head."""
    return nnx.split(modules.build(modules.DecodingConfig(d_model=12, vocab_size=37)))


def _leaves(state):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state)}


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("weights", kernels.WEIGHTS)
def test_pack_state_packs_kernels_for_dense(weights):
    graphdef, state = _decoding()
    packed = kernels.pack_state(state, weights)
    before, after = _leaves(state), _leaves(packed)
    assert before.keys() == after.keys() and sum("kernel" in key for key in before) == 1
    for key, x in before.items():
        if "kernel" not in key:
            assert after[key] is x
            continue
        assert after[key].shape == (2, 12, 32) and after[key].dtype == jnp.dtype(weights)
        expected = _bf16(x) if weights == "bfloat16" else x
        np.testing.assert_array_equal(kernels.unpack(after[key], 37), expected)
    # Dense runs the native matmul on the panels; XLA's dot with the same weights agrees.
    h = _normal(5, (2, 3, 12))
    expected = nnx.merge(graphdef, kernels.pack_state(state, weights, native=False))(h)
    np.testing.assert_allclose(nnx.merge(graphdef, packed)(h), expected, rtol=1e-4, atol=1e-5)


def test_pack_state_without_native_kernels_and_bad_weights():
    _, state = _decoding()
    before = _leaves(state)
    plain = _leaves(kernels.pack_state(state, native=False))
    assert all(plain[key] is x for key, x in before.items())
    rounded = _leaves(kernels.pack_state(state, "bfloat16", native=False))
    for key, x in before.items():
        if "kernel" in key:
            assert rounded[key].shape == x.shape and rounded[key].dtype == jnp.float32
            np.testing.assert_array_equal(rounded[key], _bf16(x))
            assert not np.array_equal(rounded[key], x)  # rounding did happen
        else:
            assert rounded[key] is x
    with pytest.raises(ValueError, match="'float16'"):
        kernels.check_weights("float16")
    with pytest.raises(ValueError, match="'float16'"):
        kernels.pack_state(state, "float16")


# ---- build modes (fresh interpreters: `available()` decides once per process) ----------------
def _python(code: str, cache_dir: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """Runs `code` in a new interpreter that imports what this one does, with `env` added."""
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu", **env}
    if cache_dir is not None:
        full["PATHWAYS_CACHE_DIR"] = str(cache_dir)
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    done = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


_PROBE = """
    from pathways import kernels
    try:
        print("available", kernels.available())
    except kernels.KernelError as e:
        print("KernelError:", e)
"""


def test_xla_mode_builds_nothing(tmp_path):
    done = _python(_PROBE, tmp_path / "cache", PATHWAYS_KERNELS="xla")
    assert done.stdout.strip() == "available False"
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("mode", ["native", "auto"])
def test_without_a_compiler(tmp_path, mode):
    (tmp_path / "bin").mkdir()  # PATH holds no compiler
    env = dict(PATHWAYS_KERNELS=mode, CXX="/nonexistent/c++", PATH=str(tmp_path / "bin"))
    done = _python(_PROBE, tmp_path / "cache", **env)
    if mode == "native":
        assert done.stdout.startswith("KernelError: PATHWAYS_KERNELS=native: no C++ compiler")
    else:
        assert done.stdout.strip() == "available False"
        assert "native kernels unavailable (no C++ compiler found" in done.stderr


def test_unknown_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("PATHWAYS_KERNELS", "bogus")
    with pytest.raises(kernels.KernelError, match="'bogus'"):
        kernels.mode()
    monkeypatch.setenv("PATHWAYS_KERNELS", " XLA ")  # case and spaces do not matter
    assert kernels.mode() == "xla"


@pytest.mark.slow  # compiles the kernels: ~8 s
@pytest.mark.usefixtures("native")
def test_builds_into_an_empty_cache(tmp_path):
    code = """
        import json
        import numpy as np
        from pathways import kernels
        assert kernels.available()
        w = np.arange(12, dtype=np.float32).reshape(3, 4)
        y = kernels.matmul(np.ones((1, 3), np.float32), kernels.pack(w), 4)
        print(json.dumps(np.asarray(y).tolist()))
    """
    done = _python(code, tmp_path, PATHWAYS_KERNELS="native")
    assert json.loads(done.stdout) == [[12.0, 15.0, 18.0, 21.0]]
    assert len(list((tmp_path / "kernels").glob("*/libpathways_kernels.so"))) == 1


@pytest.mark.usefixtures("native")
@pytest.mark.skipif(CPUS < 2, reason="splitting panels over threads needs at least 2 CPUs")
def test_matmul_split_over_a_two_thread_pool():
    code = """
        from pathways import cpu
        assert cpu.limit_threads(2) == 2  # before JAX's first computation
        import jax.numpy as jnp
        import numpy as np
        from pathways import kernels
        assert kernels.available()
        rng = np.random.default_rng(0)
        for weights in kernels.WEIGHTS:
            for m in (1, 9):
                x = rng.standard_normal((m, 72), dtype=np.float32)
                packed = kernels.pack(rng.standard_normal((72, 1000), dtype=np.float32), weights)
                w = np.asarray(kernels.unpack(packed, 1000), np.float64)
                y = kernels.matmul(x, packed, 1000)  # 32 panels over 2 tasks
                np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)
                if weights == "bfloat16" and m > 8 and kernels.tiles_available():
                    xb = np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float64)
                    y = kernels.matmul(x, packed, 1000, tiles=True)  # AMX on both threads
                    np.testing.assert_allclose(y, xb @ w, rtol=1e-5, atol=1e-5)
        print("ok")
    """
    assert _python(code, PATHWAYS_KERNELS="native").stdout.strip() == "ok"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next(
        (set(ln.split(":", 1)[1].split()) for ln in text.splitlines() if ln.startswith("flags")),
        set(),
    )


@pytest.mark.slow  # compiles the kernels for AVX2 in a fresh cache and reruns their tests: ~15 s
@pytest.mark.usefixtures("native")
@pytest.mark.skipif(
    not {"avx2", "fma"} <= _cpu_flags(), reason="the AVX2 build runs only on a CPU with AVX2/FMA"
)
def test_the_avx2_build_computes_what_the_reference_does(tmp_path):
    """The kernels compiled for AVX2 (`PATHWAYS_KERNELS_MARCH=haswell`: 8 lanes, 16 registers,
    other row groups and passes than AVX-512's) pass the matmul and attention tests: the code
    AVX2-only machines run, checked on machines with AVX-512 too."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    env.update(
        PATHWAYS_KERNELS="native",
        PATHWAYS_KERNELS_MARCH="haswell",
        PATHWAYS_CACHE_DIR=str(tmp_path),
    )
    tests = "matmul_matches or matmul_leading or attend_cached_matches or split_over"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " skipped" not in done.stdout, done.stdout[-2000:]
    built = list(tmp_path.glob("kernels/*/libpathways_kernels.so"))
    assert len(built) == 1, "the AVX2 tests ran on a library built elsewhere"


@pytest.mark.slow  # compiles the kernels in a fresh cache: ~8 s
@pytest.mark.usefixtures("native")
@pytest.mark.parametrize(
    "decode, prefill",
    [(False, False), (True, True), (True, False)],
    ids=["slower-everywhere", "faster-everywhere", "faster-for-decode-only"],
)
def test_auto_uses_the_kernels_only_for_the_shapes_where_they_measured_faster(
    tmp_path, decode, prefill
):
    """The default (auto) on machines where the kernels are slower, faster, or faster only for
    decode steps (an AVX2 build here: 1.9x faster decode, 1.8x slower prefill), with the
    measurement forced: where they are slower for every shape, serving weights are not packed;
    where only decode gains, a module keeps a packed copy for decode steps and an XLA copy for
    prefill chunks (a bfloat16 one keeps the decode copy only); every way, a session computes
    what XLA's ops compute."""
    times = {"decode": (1.0, 2.0) if decode else (2.0, 1.0)}
    times["prefill"] = (1.0, 2.0) if prefill else (2.0, 1.0)
    code = f"""
        import numpy as np
        from pathways.kernels import build
        build._measure = lambda: {times!r}
        from pathways import kernels, spec as spec_lib
        from pathways.executor.local import LocalExecutor
        from pathways.sampling import SamplingParams
        print("chosen", kernels.available(), kernels.chosen("decode"), kernels.chosen("prefill"))
        spec = spec_lib.from_dict({{
            "modules": {{
                "embed": {{"kind": "embedding", "vocab_size": 64, "d_model": 32, "max_seq_len": 32}},
                "attn": {{"kind": "attention", "d_model": 32, "n_layers": 2, "n_heads": 4,
                          "max_seq_len": 32}},
                "head": {{"kind": "decoding", "d_model": 32, "vocab_size": 64}},
            }},
            "pathways": {{"p": ["embed", "attn", "head"]}},
        }})
        logits = {{}}
        for native in (None, False):
            ex = LocalExecutor(spec, native=native)
            for rt in ex.runtimes.values():
                rt.compact()  # as a module server does: the float32 parameters dropped
            s = ex.open_session("p", [SamplingParams()])
            r = ex.prefill(s, [list(range(1, 11))], return_logits=True)
            d = ex.decode(s, r.tokens, return_logits=True)
            logits[native] = (np.asarray(r.logits), np.asarray(d.logits))
            if native is None:
                print("copies", sorted(ex.runtimes["attn"]._servings))
        for a, b in zip(logits[None], logits[False]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        print("same as xla")
        ex = LocalExecutor(spec, weights="bfloat16")
        for rt in ex.runtimes.values():
            rt.compact()
        s = ex.open_session("p", [SamplingParams()])
        ex.decode(s, ex.prefill(s, [list(range(1, 11))]).tokens)
        print("bfloat16 copies", sorted(ex.runtimes["attn"]._servings))
    """
    done = _python(code, tmp_path / "cache", PATHWAYS_KERNELS="auto")
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["chosen", *map(str, [decode or prefill, decode, prefill])]
    copies = [True] if decode and prefill else [False] if not decode else [False, True]
    # bfloat16 weights keep one copy (two would hold as many bytes as float32): the decode one.
    assert lines[1:] == [
        f"copies {copies}",
        "same as xla",
        f"bfloat16 copies [{decode}]",
    ], done.stdout
    [decision] = (tmp_path / "cache").rglob("decision*.json")
    record = json.loads(decision.read_text())
    assert record["chosen"] == {"decode": decode, "prefill": prefill}
    assert record["seconds"]["prefill"] == list(times["prefill"])
    # Decided once per machine: a second process reads the cached decision, measures nothing.
    again = _python(
        "from pathways.kernels import build\n"
        "build._measure = None  # calling it would fail\n"
        "from pathways import kernels\nprint(kernels.chosen('decode'), kernels.chosen('prefill'))",
        tmp_path / "cache",
        PATHWAYS_KERNELS="auto",
    )
    assert again.stdout.split() == [str(decode), str(prefill)]


def test_decide_applies_its_margin():
    def measure(native_s, xla_s):
        return lambda: {"decode": (native_s, xla_s), "prefill": (xla_s, native_s)}

    decide = kernels.build.decide
    assert decide(None, measure(1.0, 1.05)) == {"decode": False, "prefill": False}  # margin
    assert decide(None, measure(1.0, 1.2)) == {"decode": True, "prefill": False}


def test_a_decision_of_another_probe_is_measured_again(tmp_path, monkeypatch):
    """A decision cached by an earlier version of the probe (a record without this version)
    is measured again and rewritten; the rewritten one is read, not measured."""
    build = kernels.build
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    lib = tmp_path / "libpathways_kernels.so"  # decide keeps decision.json beside it
    old = {"chosen": {"decode": False, "prefill": False}, "seconds": {}, "margin": 1.1}
    (tmp_path / "decision.json").write_text(json.dumps(old))
    monkeypatch.setattr(build, "_measure", lambda: {"decode": (1.0, 2.0), "prefill": (1.0, 2.0)})
    assert build.decide(lib) == {"decode": True, "prefill": True}
    record = json.loads((tmp_path / "decision.json").read_text())
    assert record["probe"] == build._PROBE_VERSION and record["chosen"]["prefill"]
    monkeypatch.setattr(build, "_measure", None)  # calling it would fail
    assert build.decide(lib) == {"decode": True, "prefill": True}


def test_each_set_of_xla_flags_gets_its_own_decision(tmp_path, monkeypatch):
    """XLA's flags change what XLA's side of the probe runs (e.g. --xla_cpu_max_isa=AVX2): a
    process started with other flags measures for itself and leaves the other decision alone."""
    build = kernels.build
    lib = tmp_path / "libpathways_kernels.so"
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(build, "_measure", lambda: {"decode": (1.0, 2.0), "prefill": (2.0, 1.0)})
    assert build.decide(lib) == {"decode": True, "prefill": False}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    monkeypatch.setattr(build, "_measure", lambda: {"decode": (2.0, 1.0), "prefill": (2.0, 1.0)})
    assert build.decide(lib) == {"decode": False, "prefill": False}
    [flagged] = tmp_path.glob("decision-*.json")
    assert json.loads(flagged.read_text())["xla_flags"] == "--xla_cpu_max_isa=AVX2"
    monkeypatch.setattr(build, "_measure", None)  # both are cached now
    assert build.decide(lib) == {"decode": False, "prefill": False}
    monkeypatch.delenv("XLA_FLAGS")
    assert build.decide(lib) == {"decode": True, "prefill": False}


@pytest.mark.usefixtures("native")
def test_the_probe_computes_the_same_blocks_both_ways():
    """The decision's probe compares like with like: its native and XLA sides (matmuls, and a
    decode step's cache write and attention) compute the same outputs and caches."""
    build = kernels.build
    rng = np.random.default_rng(0)
    layers = [
        {k: jnp.asarray(rng.standard_normal(kn, np.float32) * 0.02) for k, kn in w.items()}
        for w in [build._PROBE_WEIGHTS] * 2
    ]
    packed = [{k: kernels.pack(w) for k, w in layer.items()} for layer in layers]
    window = 8  # within the small cache
    native = jax.jit(build._probe_blocks(kernels.matmul, kernels.attend_cached, window))
    xla = jax.jit(build._probe_blocks(lambda x, w, n: x @ w, build._xla_attend, window))
    x = jnp.asarray(rng.standard_normal((3, 1, build._D), np.float32))
    cache_shape = (2, 4, 16, build._HEADS, build._D // build._HEADS)
    cache = [jnp.asarray(rng.standard_normal(cache_shape, np.float32)) for _ in range(2)]
    positions, slots = jnp.asarray([[5], [0], [7]], jnp.int32), jnp.asarray([2, 0, 3], jnp.int32)
    got = native(x, packed, [jnp.copy(c) for c in cache], positions, slots)
    want = xla(x, layers, [jnp.copy(c) for c in cache], positions, slots)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    prefill = jnp.asarray(rng.standard_normal((1, 5, build._D), np.float32))
    np.testing.assert_allclose(
        np.asarray(native(prefill, packed)), np.asarray(xla(prefill, layers)), rtol=1e-4, atol=1e-5
    )
    times = build._measure()  # and the probe itself runs: positive times, both sides
    assert sorted(times) == sorted(build.SHAPES)
    assert all(t > 0 for pair in times.values() for t in pair), times


@pytest.mark.usefixtures("native")
def test_the_probe_runs_its_programs_when_first_asked_inside_a_trace(monkeypatch):
    """`kernels.matmul` first called in a jitted function decides there: the probe must still
    run its programs, not stage them into the caller's (it timed the staging, ~1 ms both sides,
    and cached that as the machine's decision)."""
    build = kernels.build
    monkeypatch.setattr(build, "_PROBES", {"decode": ((1,), 1), "prefill": ((4,), 1)})
    monkeypatch.setattr(build, "_PROBE_REPEAT", 1)
    waited = []
    real = jax.block_until_ready

    def spy(x):
        waited.extend(type(leaf) for leaf in jax.tree.leaves(x))
        return real(x)

    monkeypatch.setattr(jax, "block_until_ready", spy)
    seen = {}

    @jax.jit
    def first_use(x):
        seen["times"] = build._measure()
        return x + 1

    assert float(first_use(1.0)) == 2.0
    assert sorted(seen["times"]) == sorted(build.SHAPES)
    assert waited and not any(issubclass(t, jax.core.Tracer) for t in waited), set(waited)


def test_unknown_shape_class_is_an_error():
    with pytest.raises(ValueError, match="'training'"):
        kernels.chosen("training")
