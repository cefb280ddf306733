"""Stateless inference in one process: decoding and checking inputs (errors name the field and
the values), and results equal to the pathways' own in-process paths (Classifier, Transcriber)."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from pathways import audio, infer
from pathways import spec as spec_lib
from pathways.classify import Classifier
from pathways.executor.local import LocalExecutor
from pathways.tokenizers import ByteTokenizer
from pathways.transcribe import Transcriber

# Text, digits and speech through one attention module (odd sizes: shapes are easy to trace).
SPEC = {
    "modules": {
        "tok": {"kind": "embedding", "vocab_size": 257, "d_model": 24, "max_seq_len": 32},
        "img": {
            "kind": "image_embedding",
            "image_size": 8,
            "channels": 1,
            "patch_size": 2,
            "d_model": 24,
        },
        "wav": {
            "kind": "audio_embedding",
            "sample_rate": 8000,
            "max_samples": 2400,
            "d_model": 24,
            "n_mels": 12,
            "n_fft": 256,
            "win_length": 200,
            "hop_length": 80,
        },
        "shared": {
            "kind": "attention",
            "d_model": 24,
            "n_layers": 1,
            "n_heads": 3,
            "max_seq_len": 32,
        },
        "lm": {"kind": "decoding", "d_model": 24, "vocab_size": 257},
        "classes": {"kind": "classification", "d_model": 24, "n_classes": 10},
        "chars": {"kind": "ctc", "d_model": 24},
    },
    "pathways": {
        "text": ["tok", "shared", "lm"],
        "digits": ["img", "shared", "classes"],
        "speech": ["wav", "shared", "chars"],
    },
}


@pytest.fixture(scope="module")
def ex():
    return LocalExecutor(spec_lib.from_dict(SPEC), seed=3)


def _png(pixels: np.ndarray) -> bytes:
    return iio.imwrite("<bytes>", pixels, extension=".png")


def test_classification_equals_the_classifier(ex):
    x = np.random.default_rng(0).uniform(0, 1, (5, 8, 8, 1)).astype(np.float32)
    res = infer.run(ex, "digits", infer.check_inputs(x, ex.spec, "digits"), top_k=0)
    want = Classifier(ex, "digits").probabilities(x)
    got = np.zeros_like(want)
    for i, (c, p) in enumerate(zip(res.classes, res.probabilities)):
        got[i, c] = p
        assert p == sorted(p, reverse=True)
    np.testing.assert_allclose(got, want, atol=1e-6)
    top = infer.run(ex, "digits", x, top_k=3)
    assert [c[:3] for c in res.classes] == top.classes


def test_png_pixels_are_scaled_to_the_unit_range(ex):
    pixels = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    name, x = infer.prepare(ex.spec, ex.spec.pathways, "", "image", _png(pixels))
    assert name == "digits" and x.shape == (1, 8, 8, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0, ..., 0], pixels / np.float32(255))


def test_transcript_equals_the_transcriber(ex):
    t = np.arange(1800) / 8000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) * np.hanning(1800)).astype(np.float32)
    name, x = infer.prepare(ex.spec, ex.spec.pathways, "", "wav", audio.encode_wav(wave, 8000))
    assert name == "speech" and x.shape == (1, 2400)  # zero-padded to max_samples
    res = infer.run(ex, name, x)
    want = Transcriber(ex, "speech").transcribe(
        infer.decode_wav(audio.encode_wav(wave, 8000), ex.spec.modules["wav"])[0], 8000
    )
    assert res.kind == "transcript" and res.texts == [want]


def test_embedding_is_the_mean_of_the_hidden_states_before_the_head(ex):
    name, x = infer.prepare(ex.spec, ex.spec.pathways, "", "text", "hello", ByteTokenizer())
    assert name == "text"
    res = infer.run(ex, name, x, output="embedding")
    hidden = ex.forward("text", x, head=False)
    assert hidden.shape == (1, 5, 24)
    np.testing.assert_allclose(res.embedding, hidden.mean(1), atol=1e-6)
    assert res.prompt_tokens == 5  # "hello": 5 bytes
    tokens = np.arange(14, dtype=np.int32).reshape(2, 7)
    assert infer.run(ex, name, tokens, output="embedding").prompt_tokens == 14
    img = infer.run(ex, "digits", np.zeros((2, 8, 8, 1), np.float32), output="embedding")
    assert img.prompt_tokens == 0


def test_bidirectional_mask_reaches_the_attention_module(ex):
    """An image's first patch sees the last one (the pathway's mask), a text's first token does
    not (checked, so the test can fail)."""
    x = np.zeros((1, 8, 8, 1), np.float32)
    y = x.copy()
    y[0, 7, 7, 0] = 1.0
    a, b = ex.forward("digits", x, head=False), ex.forward("digits", y, head=False)
    assert np.abs(a[0, 0] - b[0, 0]).max() > 1e-4
    t = np.array([[1, 2, 3]], np.int32)
    a, b = ex.forward("text", t, head=False), ex.forward("text", t + [[0, 0, 1]], head=False)
    np.testing.assert_array_equal(a[0, :2], b[0, :2])


BAD = [
    ("image", b"", "InferError", "image: empty"),
    ("image", b"not a png", "InferError", "image: not a readable PNG"),
    (
        "image",
        b"\x89PNG\r\n\x1a\ntruncated",
        "InferError",
        "image: not a readable PNG or JPEG (17 bytes)",
    ),
    ("image", np.zeros((16, 16), np.uint8), "InferError", "16x16 pixels"),
    ("image", np.zeros((8, 8, 3), np.uint8), "InferError", "3 channel(s)"),
    ("wav", b"RIFF", "InferError", "wav: not a WAV"),
    ("wav", ("stereo", 8000), "InferError", "2 channels"),
    ("wav", ("mono", 16000), "InferError", "sample rate 16000 Hz"),
    ("wav", ("mono24", 8000), "InferError", "24 bits"),
    ("wav", ("short", 8000), "InferError", "200 <= N <= 2400"),
    ("tensor", np.zeros((2, 8, 8), np.float32), "InferError", "(B, 8, 8, 1)"),
    ("tensor", np.zeros((2, 8, 8, 1), np.int32), "InferError", "float32 image; got int32"),
    ("tensor", np.full((1, 8, 8, 1), np.nan, np.float32), "InferError", "NaN"),
    ("tensor", np.zeros((0, 8, 8, 1), np.float32), "InferError", "a batch of 1 to 256"),
    ("text", "", "InferError", "text: empty"),
]


def _wav(kind: str, rate: int) -> bytes:
    w = audio.encode_wav(np.zeros(1000 if kind != "short" else 100, np.float32), rate)
    if kind == "stereo":  # channels = 2 in the fmt chunk
        return w[:22] + (2).to_bytes(2, "little") + w[24:]
    if kind == "mono24":  # 24-bit samples
        return w[:34] + (24).to_bytes(2, "little") + w[36:]
    return w


@pytest.mark.parametrize("field,value,error,says", BAD, ids=[b[3] for b in BAD])
def test_bad_inputs_are_named(ex, field, value, error, says):
    if field == "image" and isinstance(value, np.ndarray):
        value = _png(value)
    if field == "wav" and isinstance(value, tuple):
        value = _wav(*value)
    pathway = {"image": "digits", "wav": "speech", "tensor": "digits", "text": "text"}[field]
    with pytest.raises(infer.InferError) as e:
        infer.prepare(ex.spec, ex.spec.pathways, pathway, field, value, ByteTokenizer())
    assert e.value.status == "INVALID_ARGUMENT" and says in str(e.value)
    assert str(e.value).startswith(field), str(e.value)


def test_wrong_pathways(ex):
    spec = ex.spec
    with pytest.raises(infer.UnknownPathway, match="unknown pathway 'nope'"):
        infer.prepare(spec, spec.pathways, "nope", "image", b"")
    with pytest.raises(infer.WrongPathway, match="pathway 'text' reads tokens"):
        infer.prepare(spec, spec.pathways, "text", "image", _png(np.zeros((8, 8), np.uint8)))
    with pytest.raises(infer.WrongPathway, match="outputs logits, not classes: use Generate"):
        infer.run(ex, "text", np.zeros((1, 3), np.int32))
    assert infer.generation_error(spec, "text") is None
    for p in ("digits", "speech"):
        assert f"pathway {p!r} reads" in infer.generation_error(spec, p)
    with pytest.raises(ValueError, match="only a pathway from tokens to next-token logits"):
        from pathways import generate
        from pathways.sampling import SamplingParams

        list(generate.stream(ex, "digits", ["x"], ByteTokenizer(), SamplingParams()))
    with pytest.raises(infer.InferError, match="top_k must be >= 0"):
        infer.run(ex, "digits", np.zeros((1, 8, 8, 1), np.float32), top_k=-1)
