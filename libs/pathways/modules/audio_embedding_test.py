"""Tests for the audio embedding: log-mel -> strided convolutions -> positions, its length, the
contract checked at spec load, shape errors."""

import numpy as np
import pytest
from flax import nnx

from pathways import audio
from pathways import spec as spec_lib
from pathways.modules import ConfigError
from pathways.modules.audio_embedding import AudioEmbedding, AudioEmbeddingConfig

# Odd sizes: 8 kHz, up to 1,213 samples, frames of 200 every 80 samples -> 13 frames -> 7 -> 4.
CFG = AudioEmbeddingConfig(
    sample_rate=8000,
    max_samples=1213,
    d_model=7,
    n_mels=11,
    n_fft=256,
    win_length=200,
    hop_length=80,
    conv_layers=2,
    kernel_size=3,
    stride=2,
)


def test_lengths():
    assert CFG.frames(1213) == 13 == audio.n_frames(1213, 200, 80)
    assert CFG.output_length == 4 and CFG.positions_of(600) == 2  # 6 frames -> 3 -> 2
    assert CFG.input_contract == ("audio", 8000) and CFG.output_contract == ("hidden", 7)


def test_forward_is_the_convolutions_of_standardised_log_mel_plus_positions():
    m = AudioEmbedding(CFG, nnx.Rngs(0))
    wave = np.random.default_rng(0).normal(0, 0.1, (2, 1213)).astype(np.float32)
    h, cache = m.step(wave, None)
    assert cache is None and h.shape == (2, 4, 7) and h.dtype == np.float32
    lm = np.asarray(
        audio.log_mel(wave, sample_rate=8000, n_fft=256, win_length=200, hop_length=80, n_mels=11)
    )
    x = (lm - lm.mean((1, 2), keepdims=True)) / (lm.std((1, 2), keepdims=True) + 1e-5)
    for conv in m.convs:  # SAME padding, stride 2, width 3, by hand
        k, b = np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])  # (3, in, out), (out,)
        t_out = -(-x.shape[1] // 2)
        pad = max((t_out - 1) * 2 + 3 - x.shape[1], 0)
        xp = np.pad(x, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)))
        y = np.stack(
            [np.einsum("bki,kio->bo", xp[:, 2 * t : 2 * t + 3], k) for t in range(t_out)], 1
        )
        x = np.asarray(nnx.gelu(y + b))
    want = x + np.asarray(m.positions[...])[None]
    np.testing.assert_allclose(np.asarray(h), want, rtol=1e-4, atol=1e-4)
    # Loudness does not matter (the log-mel frames are standardised per utterance).
    np.testing.assert_allclose(np.asarray(m(wave * 3.0)), np.asarray(h), rtol=1e-3, atol=1e-3)
    # A shorter waveform gives fewer positions with the first learned positions.
    assert m(wave[:, :600]).shape == (2, 2, 7)


@pytest.mark.parametrize("shape", [(2, 1214), (2, 199), (1213,), (2, 1213, 2)])
def test_wrong_waveform_shape_names_the_limits(shape):
    m = AudioEmbedding(CFG, nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"200 <= samples <= max_samples 1213 .*8000 Hz"):
        m(np.zeros(shape, np.float32))


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(win_length=300), "win_length (300) must be at most n_fft (256)"),
        (dict(n_mels=200), "n_mels (200) must be at most n_fft // 2 + 1 (129)"),
        (dict(max_samples=100), "max_samples (100) must hold one window (win_length 200)"),
        (dict(sample_rate=0), "sample_rate must be a positive integer, got 0"),
        (dict(stride=0), "stride must be a positive integer, got 0"),
    ],
)
def test_config_errors_name_field_and_value(fields, words):
    with pytest.raises(ConfigError, match=__import__("re").escape(words)):
        AudioEmbeddingConfig(**{**CFG.__dict__, **fields})


def _speech_spec(max_seq_len=64, max_samples=16000, d_attn=32, head=None):
    return {
        "modules": {
            "frames": {
                "kind": "audio_embedding",
                "sample_rate": 16000,
                "max_samples": max_samples,
                "d_model": 32,
            },
            "attn": {
                "kind": "attention",
                "d_model": d_attn,
                "n_layers": 1,
                "n_heads": 2,
                "max_seq_len": max_seq_len,
            },
            "chars": head or {"kind": "ctc", "d_model": d_attn},
        },
        "pathways": {"speech": ["frames", "attn", "chars"]},
    }


def test_spec_contracts():
    s = spec_lib.from_dict(_speech_spec())
    p = s.pathway("speech")
    assert not p.causal and p.max_seq_len == 25  # 98 frames -> 49 -> 25 positions
    with pytest.raises(
        spec_lib.SpecError,
        match=r"'frames' \(audio_embedding\) outputs 25 "
        r"positions but 'attn' has max_seq_len 24",
    ):
        spec_lib.from_dict(_speech_spec(max_seq_len=24))
    with pytest.raises(
        spec_lib.SpecError, match="d_model mismatch: 'frames' outputs 32 but " "'attn' expects 48"
    ):
        spec_lib.from_dict(_speech_spec(d_attn=48))
    with pytest.raises(
        spec_lib.SpecError,
        match=r"'chars' \(decoding\) predicts next tokens but "
        r"'frames' \(audio_embedding\) reads audio, not tokens",
    ):
        spec_lib.from_dict(_speech_spec(head={"kind": "decoding", "d_model": 32, "vocab_size": 29}))
    with pytest.raises(
        spec_lib.SpecError,
        match="module .frames.: max_samples must be a positive integer, got .1s.",
    ):
        spec_lib.from_dict(_speech_spec(max_samples="1s"))
