"""Tests for the CTC head: the loss against a brute-force sum over alignments, greedy collapse
rules, prefix beam search against greedy and against exact likelihoods, labels and errors."""

import itertools
import math

import numpy as np
import pytest
from flax import nnx

from pathways.modules import ConfigError
from pathways.modules.ctc import Ctc, CtcConfig, beam_decode, ctc_loss, greedy_decode


def collapse(path):
    out, prev = [], 0
    for s in path:
        if s != prev and s != 0:
            out.append(s)
        prev = s
    return out


def brute_log_likelihood(log_probs_tc, labels):
    """log sum over every path of T symbols that collapses to `labels`."""
    t, c = log_probs_tc.shape
    total = 0.0
    for path in itertools.product(range(c), repeat=t):
        if collapse(path) == list(labels):
            total += math.exp(sum(log_probs_tc[i, s] for i, s in enumerate(path)))
    return math.log(total) if total > 0 else -math.inf


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return (
        x
        - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - x.max(-1, keepdims=True)
    )


def test_loss_is_the_sum_over_alignments():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (4, 5, 3)).astype(np.float32)  # B=4, T=5, blank + "ab"
    labels = np.array([[1, 2, 0], [1, 1, 0], [2, 0, 0], [2, 1, 2]], np.int32)
    got = np.asarray(ctc_loss(logits, labels))
    for b in range(4):
        want = -brute_log_likelihood(log_softmax(logits[b]), [s for s in labels[b] if s])
        assert got[b] == pytest.approx(want, rel=1e-5)
    # "aa" needs a blank between the a's: the path a-a-b-b-b is "ab", a-blank-a-b-b is "aab".
    assert collapse([1, 1, 2, 2, 2]) == [1, 2] and collapse([1, 0, 1, 2, 2]) == [1, 1, 2]


def test_head_loss_is_the_mean_over_unmasked_examples():
    cfg = CtcConfig(d_model=5, alphabet="ab")
    m = Ctc(cfg, nnx.Rngs(0))
    h = np.random.default_rng(1).normal(size=(3, 4, 5)).astype(np.float32)
    labels = np.array([[1, 2], [2, 0], [1, 0]], np.int32)
    logits, cache = m.step(h, None)
    assert cache is None and logits.shape == (3, 4, 3)
    per = np.asarray(ctc_loss(logits, labels))
    assert float(m.loss(h, labels)) == pytest.approx(per.mean(), rel=1e-6)
    mask = np.array([1, 0, 1], np.int32)
    assert float(m.loss(h, labels, mask)) == pytest.approx((per[0] + per[2]) / 2, rel=1e-6)


def test_greedy_collapses_repeats_and_drops_blanks():
    def onehot(path, c=4):
        lp = np.full((len(path), c), -5.0)
        lp[np.arange(len(path)), path] = -0.1
        return lp

    assert greedy_decode(onehot([1, 1, 0, 1, 2, 2, 0, 0, 3])) == [1, 1, 2, 3]
    assert greedy_decode(onehot([0, 0, 0])) == []
    assert greedy_decode(onehot([2, 2, 2, 2])) == [2]
    assert greedy_decode(onehot([2, 0, 2, 3, 0, 3])) == [2, 2, 3, 3]


def test_beam_finds_the_likelier_labelling_greedy_misses():
    # Per position: blank 0.4, a 0.32, b 0.28. Greedy (blank, blank) gives "" (p 0.16); "a" sums
    # a-a, a-blank and blank-a: 0.1024 + 0.128 + 0.128 = 0.3584.
    lp = np.log(np.array([[0.4, 0.32, 0.28]] * 2))
    assert greedy_decode(lp) == []
    labels, score = beam_decode(lp, beam=4)
    assert labels == [1] and score == pytest.approx(math.log(0.3584), rel=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_beam_is_at_least_as_likely_as_greedy_and_scores_exactly(seed):
    rng = np.random.default_rng(seed)
    lp = log_softmax(rng.normal(0, 1.0, (6, 4)))
    greedy = greedy_decode(lp)
    labels, score = beam_decode(lp, beam=4)
    exact = brute_log_likelihood(lp, labels)
    assert exact >= brute_log_likelihood(lp, greedy) - 1e-9
    assert score <= exact + 1e-9  # the beam's sum covers some of the alignments
    # With a beam that never prunes, its score is the exact likelihood and its answer the best.
    labels_all, score_all = beam_decode(lp, beam=10_000)
    assert score_all == pytest.approx(brute_log_likelihood(lp, labels_all), rel=1e-9)
    assert score_all >= exact - 1e-9


def test_labels_encode_and_decode():
    cfg = CtcConfig(d_model=4)
    assert cfg.n_symbols == 29 and cfg.output_contract == ("characters", 29)
    enc = cfg.encode(["cab", "it's"], 6)
    np.testing.assert_array_equal(enc, [[3, 1, 2, 0, 0, 0], [9, 20, 27, 19, 0, 0]])
    assert cfg.decode(enc[1]) == "it's" and cfg.decode([0, 8, 0, 9]) == "hi"
    with pytest.raises(ValueError, match=r"text 'Cab': 'C' is not in the alphabet"):
        cfg.encode(["Cab"], 6)
    with pytest.raises(ValueError, match="text 'abcdefg' has 7 characters, more than 6"):
        cfg.encode(["abcdefg"], 6)


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(alphabet=""), "alphabet must be a non-empty string, got ''"),
        (dict(alphabet="abca"), "alphabet must not repeat characters, got 'abca'"),
        (dict(d_model=0), "d_model must be a positive integer, got 0"),
        (dict(norm="batch"), "norm must be one of layernorm, rmsnorm; got 'batch'"),
    ],
)
def test_config_errors_name_field_and_value(fields, words):
    with pytest.raises(ConfigError, match=__import__("re").escape(words)):
        CtcConfig(**{"d_model": 4, **fields})
