"""Transcriber: checks its input (sample rate, shape, length, values) with errors naming them,
decodes a pathway's CTC outputs greedily or by beam, and reads a checkpoint as it was trained."""

import jax
import numpy as np
import pytest

from pathways import checkpoint as ckpt
from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.modules.ctc import greedy_decode
from pathways.runtime import composite_forward
from pathways.tokenizers import ByteTokenizer
from pathways.train import LocalTrainer, TrainConfig
from pathways.transcribe import Transcriber

SPEC = spec_lib.from_dict(
    {
        "modules": {
            "frames": {
                "kind": "audio_embedding",
                "sample_rate": 8000,
                "max_samples": 2000,
                "d_model": 12,
                "n_mels": 10,
                "n_fft": 256,
                "win_length": 200,
                "hop_length": 80,
            },
            "attn": {
                "kind": "attention",
                "d_model": 12,
                "n_layers": 1,
                "n_heads": 3,
                "max_seq_len": 8,
            },
            "chars": {"kind": "ctc", "d_model": 12, "alphabet": "abc"},
            "embed": {"kind": "embedding", "vocab_size": 11, "d_model": 12, "max_seq_len": 8},
            "head": {"kind": "decoding", "d_model": 12, "vocab_size": 11},
        },
        "pathways": {"speech": ["frames", "attn", "chars"], "text": ["embed", "attn", "head"]},
    }
)


def _wave(n, seed=0):
    return np.random.default_rng(seed).normal(0, 0.1, n).astype(np.float32)


def _force(ex, symbol):
    """Makes the head output `symbol` at every position."""
    st = ex.state("chars")
    st.head.kernel[...] = st.head.kernel[...] * 0
    st.head.bias[...] = st.head.bias[...].at[symbol].set(50.0)
    ex.set_state("chars", st)


def test_decodes_what_the_head_says():
    ex = LocalExecutor(SPEC, seed=1)
    tr = Transcriber(ex)  # the spec's only speech pathway
    assert tr.pathway == "speech" and tr.sample_rate == 8000
    w = _wave(1500)
    padded = np.zeros((1, 2000), np.float32)
    padded[0, :1500] = w
    lp = np.asarray(
        composite_forward(
            ex.chain("speech"), [rt.state for rt in ex.chain("speech")], padded, causal=False
        )
    )[0]
    assert tr.transcribe(w, 8000) == SPEC.modules["chars"].decode(greedy_decode(lp))
    _force(ex, 2)
    assert tr.transcribe(w, 8000) == "b"  # every position says b: one b
    assert Transcriber(ex, "speech", beam=4).transcribe_many([w, _wave(999, 1)], 8000) == ["b", "b"]
    _force(ex, 0)
    assert tr.transcribe(w, 8000) == ""  # blanks only


def test_checkpoint_equals_in_process(tmp_path):
    ex = LocalExecutor(SPEC, seed=2)
    ckpt.save_spec(tmp_path, SPEC, ByteTokenizer())
    for m in SPEC.pathway("speech").modules:
        ckpt.save_module(tmp_path, m, ex.state(m))
    waves = [_wave(2000, 3), _wave(700, 4)]
    a, b = Transcriber(ex), Transcriber(tmp_path, "speech")
    np.testing.assert_allclose(a.log_probs(waves), b.log_probs(waves), rtol=1e-6, atol=1e-6)
    assert a.transcribe_many(waves, 8000) == b.transcribe_many(waves, 8000)
    part = tmp_path / "part"
    ckpt.save_spec(part, SPEC, ByteTokenizer())
    ckpt.save_module(part, "frames", ex.state("frames"))
    with pytest.raises(ValueError, match="has no weights for module.s. attn, chars"):
        Transcriber(part)


@pytest.mark.parametrize(
    "wave, rate, words",
    [
        (_wave(1000), 16000, "sample rate 16000 Hz: pathway 'speech' reads 8000 Hz audio"),
        (np.zeros((1000, 2), np.float32), 8000, r"mono, shape \(samples,\); got shape \(1000, 2\)"),
        (_wave(2001), 8000, r"2001 samples \(0.250 s\); pathway 'speech' reads 200 to 2000"),
        (_wave(100), 8000, "100 samples"),
        (np.full(500, np.nan, np.float32), 8000, "NaN or infinite"),
        (np.zeros(500, np.int64), 8000, "float .or int16 PCM.; got dtype int64"),
    ],
)
def test_bad_input_is_named(wave, rate, words):
    with pytest.raises(ValueError, match=words):
        Transcriber(LocalExecutor(SPEC)).transcribe(wave, rate)


def test_int16_and_column_vectors_are_accepted():
    tr = Transcriber(LocalExecutor(SPEC))
    w = _wave(900)
    pcm = (w * 32768).astype(np.int16)
    np.testing.assert_allclose(tr.check(pcm[:, None], 8000), pcm / 32768.0)


def test_pathway_must_be_a_speech_one():
    ex = LocalExecutor(SPEC)
    with pytest.raises(ValueError, match="pathway 'text' reads tokens and outputs logits"):
        Transcriber(ex, "text")
    with pytest.raises(ValueError, match="unknown pathway 'nope'"):
        Transcriber(ex, "nope")
    with pytest.raises(ValueError, match="beam must be a non-negative integer"):
        Transcriber(ex, beam=-1)


# Training a speech pathway through the Trainer: fused and pipelined alike (the data set needs
# espeak-ng; a small one: 27 words, 48 training utterances).
TRAIN_SPEC = spec_lib.from_dict(
    {
        "modules": {
            "frames": {
                "kind": "audio_embedding",
                "sample_rate": 16000,
                "max_samples": 16000,
                "d_model": 16,
                "n_mels": 20,
            },
            "attn": {
                "kind": "attention",
                "d_model": 16,
                "n_layers": 1,
                "n_heads": 2,
                "max_seq_len": 32,
            },
            "chars": {"kind": "ctc", "d_model": 16},
        },
        "pathways": {"speech": ["frames", "attn", "chars"]},
    }
)
TRAIN_CFG = TrainConfig(
    steps=25, batch_size=8, seq_len=25, lr=1e-2, warmup=2, eval_every=25, save_every=25
)


@pytest.fixture(scope="module")
def small_speech(tmp_path_factory):
    from pathways.datasets import speech

    if not speech.espeak_available():
        pytest.skip("espeak-ng is not installed (Debian package espeak-ng; .ci/run installs it)")
    mp = pytest.MonkeyPatch()
    mp.setenv("PATHWAYS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    speech.speech.cache_clear()
    yield speech.speech(train_per_word=2, test_per_word=1, unseen_per_word=1, vocabulary=27)
    speech.speech.cache_clear()
    mp.undo()


def _rel_err(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(la, lb))
    return diff / max(float(np.abs(np.asarray(y)).max()) for y in lb)


def test_a_few_steps_lower_the_ctc_loss_fused_and_pipelined_alike(tmp_path, small_speech):
    small_speech.check_pathway(TRAIN_SPEC, "speech")
    runs = {}
    for engine in ("fused", "pipeline"):
        ex = LocalExecutor(TRAIN_SPEC, seed=4)
        trainer = LocalTrainer(
            ex, "speech", TRAIN_CFG, small_speech, tmp_path / engine, ByteTokenizer(), engine=engine
        )
        runs[engine] = (ex, trainer.run())
    (fused_ex, fused), (pipe_ex, piped) = runs["fused"], runs["pipeline"]
    first, last = fused[0]["loss"], np.mean([r["loss"] for r in fused[-3:]])
    assert last < 0.7 * first, (first, last)
    np.testing.assert_allclose([r["loss"] for r in piped], [r["loss"] for r in fused], rtol=1e-4)
    for name in TRAIN_SPEC.pathway("speech").modules:
        assert _rel_err(pipe_ex.state(name), fused_ex.state(name)) <= 1e-3, name
    # The executor's loss (bidirectional, as trained) is the eval loss the trainer recorded.
    evals = [
        small_speech.batch(i, 8, 0, TRAIN_CFG.seed, split="eval")
        for i in range(TRAIN_CFG.eval_batches)
    ]
    loss = np.mean([fused_ex.loss("speech", x, y) for x, y in evals])
    assert loss == pytest.approx(fused[-1]["eval_loss"], rel=1e-5)
    # The transcriber reads what was trained: a string per held-out utterance, in the alphabet.
    u = small_speech.splits["test"]
    texts = Transcriber(fused_ex).transcribe_many([u.wave(i) for i in range(4)], 16000)
    assert len(texts) == 4 and all(
        set(t) <= set(TRAIN_SPEC.modules["chars"].alphabet) for t in texts
    )


def test_edit_distance_and_error_rates():
    from pathways.transcribe import edit_distance, error_rates

    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3
    assert edit_distance("flaw", "lawn") == 2 and edit_distance("same", "same") == 0
    r = error_rates(["about", "abve", ""], ["about", "above", "air"])
    assert r["cer"] == pytest.approx((0 + 1 + 3) / 13) and r["word_accuracy"] == pytest.approx(
        1 / 3
    )
    with pytest.raises(ValueError, match="as many hypotheses as references"):
        error_rates(["a"], ["a", "b"])
