"""Transcriber: checks its input (sample rate, shape, length, values) with errors naming them,
decodes a pathway's CTC outputs greedily or by beam, and reads a checkpoint as it was trained."""

import numpy as np
import pytest

from pathways import checkpoint as ckpt
from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.modules.ctc import greedy_decode
from pathways.runtime import composite_forward
from pathways.tokenizers import ByteTokenizer
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
