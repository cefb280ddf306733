"""Tests for the sampler: greedy, temperature, top-k, top-p, seeds and per-row settings."""

import jax
import numpy as np
import pytest

from pathways.sampling import SamplingBatch, SamplingParams, sample

V = 37
_sample = jax.jit(sample)


def _logits(b, seed=0):
    return np.random.default_rng(seed).standard_normal((b, V)).astype(np.float32) * 2


def _draw(logits, temperature=0.0, top_k=0, top_p=1.0, seed=0, step=None):
    b = logits.shape[0]
    full = lambda x, dt: np.broadcast_to(np.asarray(x, dt), (b,))
    steps = np.zeros(b, np.int32) if step is None else full(step, np.int32)
    return np.asarray(
        _sample(
            logits,
            full(temperature, np.float32),
            full(top_k, np.int32),
            full(top_p, np.float32),
            full(seed, np.uint32),
            steps,
        )
    )


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_is_argmax():
    logits = _logits(7)
    np.testing.assert_array_equal(_draw(logits), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 30.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature):
    logits = _logits(7)
    for seed in range(3):
        out = _draw(logits, temperature=temperature, top_k=1, seed=seed)
        np.testing.assert_array_equal(out, logits.argmax(-1))


def test_tiny_top_p_keeps_only_the_top_token():
    logits = _logits(7)
    out = _draw(logits, temperature=5.0, top_p=1e-6, seed=1)
    np.testing.assert_array_equal(out, logits.argmax(-1))


def test_same_seed_same_draws_different_seeds_differ():
    logits = np.zeros((64, V), np.float32)  # uniform: draws depend only on the key
    a = _draw(logits, temperature=1.0, seed=5, step=np.arange(64))
    b = _draw(logits, temperature=1.0, seed=5, step=np.arange(64))
    c = _draw(logits, temperature=1.0, seed=6, step=np.arange(64))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5
    # The step also changes the draw (each decode step samples afresh).
    d = _draw(logits, temperature=1.0, seed=5, step=np.arange(64) + 1)
    assert (a != d).mean() > 0.5


def test_per_row_settings_in_one_batch():
    logits = np.tile(_logits(1, seed=3), (4, 1))
    params = [
        SamplingParams(),  # greedy
        SamplingParams(temperature=10.0, top_k=1, seed=1),
        SamplingParams(temperature=10.0, seed=2),
        SamplingParams(temperature=10.0, top_p=1e-6, seed=3),
    ]
    s = SamplingBatch.of(params)
    best = int(logits[0].argmax())
    seen_row2 = set()
    for step in range(40):
        out = np.asarray(_sample(logits, *s.as_tuple(), np.full(4, step, np.int32)))
        assert out[0] == out[1] == out[3] == best
        seen_row2.add(int(out[2]))
    assert len(seen_row2) > 10  # the hot row beside them really samples


def _frequencies(logits_v, n=4000, **kw):
    logits = np.tile(logits_v, (n, 1))
    out = _draw(logits, seed=11, step=np.arange(n), **kw)
    return np.bincount(out, minlength=len(logits_v)) / n


def test_frequencies_follow_softmax_at_temperature_1():
    logits_v = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    freq = _frequencies(logits_v, temperature=1.0)
    # n = 4000: the standard error of each frequency is at most 0.008, so 0.03 is ~4 sigma.
    np.testing.assert_allclose(freq, _softmax(logits_v), atol=0.03)
    freq2 = _frequencies(logits_v, temperature=2.0)
    np.testing.assert_allclose(freq2, _softmax(logits_v / 2), atol=0.03)


def test_top_k_and_top_p_renormalise_over_the_kept_tokens():
    logits_v = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    freq = _frequencies(logits_v, temperature=1.0, top_k=2)
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
    # Nucleus 0.7: the smallest prefix whose mass reaches 0.7 is {0.5, 0.3}.
    freq = _frequencies(logits_v, temperature=1.0, top_p=0.7)
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
    freq = _frequencies(logits_v, temperature=1.0, top_p=0.85)
    assert freq[3] == 0 and freq[2] > 0.1


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(temperature=-0.1), ["temperature", "-0.1"]),
        (dict(top_k=-1), ["top_k", "-1"]),
        (dict(top_k=2.5), ["top_k", "2.5"]),
        (dict(top_p=0.0), ["top_p", "0.0"]),
        (dict(top_p=1.5), ["top_p", "1.5"]),
        (dict(max_new_tokens=-3), ["max_new_tokens", "-3"]),
        (dict(seed=-1), ["seed", "-1"]),
        (dict(stop="\n"), ["stop", "'\\n'"]),
        (dict(stop=("",)), ["stop", "''"]),
        (dict(stop=("x",) * 17), ["17 sequences", "at most 16", "MAX_STOPS"]),
        (dict(stop=("y" * 4000, "z" * 97)), ["4097 characters", "MAX_STOP_CHARS"]),
    ],
)
def test_sampling_params_validation(kwargs, words):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_sampling_params_stop_becomes_a_tuple():
    assert SamplingParams(stop=["\n\n", "def "]).stop == ("\n\n", "def ")


def test_a_static_draw_flag_gives_what_the_device_side_choice_gives():
    """draw=True/False (a session's fixed settings) compile one branch; the tokens are the ones
    the on-device conditional (draw=None) picks."""
    logits = _logits(3, seed=5)
    mixed = SamplingBatch.of([SamplingParams(), SamplingParams(temperature=2.0, seed=4)] * 2)
    greedy = SamplingBatch.of([SamplingParams()] * 3)
    flagged = jax.jit(sample, static_argnames="draw")
    for step in range(5):
        steps = np.full(4, step, np.int32)
        ref = np.asarray(_sample(np.tile(logits[:1], (4, 1)), *mixed.as_tuple(), steps))
        got = flagged(np.tile(logits[:1], (4, 1)), *mixed.as_tuple(), steps, draw=True)
        np.testing.assert_array_equal(np.asarray(got), ref)
    steps = np.zeros(3, np.int32)
    ref = np.asarray(_sample(logits, *greedy.as_tuple(), steps))
    np.testing.assert_array_equal(
        np.asarray(flagged(logits, *greedy.as_tuple(), steps, draw=False)), ref
    )
    np.testing.assert_array_equal(ref, logits.argmax(-1))
