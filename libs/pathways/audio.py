"""Log-mel front end in JAX: waveform (B, samples) -> log-mel frames (B, T, n_mels).

Frames of `win_length` samples every `hop_length` samples (no centring: a frame is only taken
where it fits), a periodic Hann window, zero padding to `n_fft`, the power of the real FFT, a
triangular mel filterbank on the HTK mel scale (mel = 2595 log10(1 + f / 700), filters of peak 1,
not area-normalised as Slaney's are), and the natural log with a floor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def n_frames(n_samples: int, win_length: int, hop_length: int) -> int:
    """Frames a waveform of `n_samples` gives (0 when shorter than one window)."""
    return 0 if n_samples < win_length else 1 + (n_samples - win_length) // hop_length


def hz_to_mel(f):
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None
) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) float32: triangles between n_mels + 2 points evenly spaced in
    mel from f_min to f_max (default sample_rate / 2), evaluated at each FFT bin's frequency."""
    f_max = sample_rate / 2 if f_max is None else f_max
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    bins_hz = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    lo, mid, hi = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]  # (n_mels,) each
    up = (bins_hz[:, None] - lo) / (mid - lo)
    down = (hi - bins_hz[:, None]) / (hi - mid)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def hann(win_length: int) -> np.ndarray:
    """Periodic Hann window (the one that overlap-adds to a constant at hop win/2)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win_length) / win_length)).astype(np.float32)


def log_mel(
    wave_bs: jax.Array,
    *,
    sample_rate: int,
    n_fft: int,
    win_length: int,
    hop_length: int,
    n_mels: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    floor: float = 1e-5,
) -> jax.Array:
    """(B, samples) float -> (B, T, n_mels) float32, T = n_frames(samples, ...)."""
    n = wave_bs.shape[-1]
    t = n_frames(n, win_length, hop_length)
    if t == 0:
        raise ValueError(f"a waveform of {n} samples is shorter than one window ({win_length})")
    idx_tw = hop_length * np.arange(t)[:, None] + np.arange(win_length)[None, :]
    frames_btw = wave_bs.astype(jnp.float32)[:, idx_tw] * hann(win_length)
    spec_btf = jnp.fft.rfft(frames_btw, n=n_fft, axis=-1)
    power_btf = jnp.real(spec_btf) ** 2 + jnp.imag(spec_btf) ** 2
    fb = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max)
    mel_btm = jnp.einsum("BTF,FM->BTM", power_btf, fb, precision=jax.lax.Precision.HIGHEST)
    return jnp.log(jnp.maximum(mel_btm, floor))


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """(waveform (samples,) float32 in [-1, 1], sample rate) of a mono PCM WAV file (8/16/32-bit
    integer or 32-bit float samples). A data chunk whose size runs past the end (a WAV written
    to a pipe, as `espeak-ng --stdout` does) is read to the end.

    Raises:
        ValueError: not a RIFF/WAVE file, no fmt or data chunk, more than one channel, or a
            sample format other than those, named.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAV file (no RIFF/WAVE header)")
    at, fmt = 12, None
    while at + 8 <= len(data):
        cid, size = data[at : at + 4], int.from_bytes(data[at + 4 : at + 8], "little")
        body = data[at + 8 : at + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise ValueError("WAV fmt chunk is shorter than 16 bytes")
            tag, channels, rate = (
                int.from_bytes(body[i : i + n], "little") for i, n in ((0, 2), (2, 2), (4, 4))
            )
            bits = int.from_bytes(body[14:16], "little")
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the subformat's tag
                tag = int.from_bytes(body[24:26], "little")
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            if fmt is None:
                raise ValueError("WAV data chunk comes before its fmt chunk")
            tag, channels, rate, bits = fmt
            if channels != 1:
                raise ValueError(f"WAV has {channels} channels; mono audio (1 channel) is needed")
            kinds = {(1, 8): "u1", (1, 16): "<i2", (1, 32): "<i4", (3, 32): "<f4"}
            dtype = kinds.get((tag, bits))
            if dtype is None:
                raise ValueError(
                    f"WAV sample format {tag} with {bits} bits is not supported (PCM 8/16/32-bit "
                    f"or float 32-bit)"
                )
            width = bits // 8
            raw = np.frombuffer(body[: len(body) // width * width], dtype)
            if dtype == "u1":
                wave = (raw.astype(np.float32) - 128.0) / 128.0
            elif dtype == "<f4":
                wave = raw.astype(np.float32)
            else:
                wave = raw.astype(np.float32) / float(2 ** (bits - 1))
            return wave, rate
        at += 8 + size + (size & 1)
    raise ValueError("WAV file has no data chunk" if fmt else "WAV file has no fmt chunk")


def encode_wav(wave: np.ndarray, sample_rate: int) -> bytes:
    """A mono 16-bit PCM WAV file of `wave` (float in [-1, 1]; clipped)."""
    pcm = (np.clip(np.asarray(wave, np.float64), -1.0, 1.0) * 32767.0).round().astype("<i2")
    body = pcm.tobytes()
    head = b"RIFF" + (36 + len(body)).to_bytes(4, "little") + b"WAVEfmt "
    head += (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
    head += sample_rate.to_bytes(4, "little") + (2 * sample_rate).to_bytes(4, "little")
    head += (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    return head + b"data" + len(body).to_bytes(4, "little") + body


def resample(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited resampling by the FFT (the spectrum cut or zero-extended to the new length);
    float32."""
    wave = np.asarray(wave, np.float64)
    if from_rate == to_rate:
        return wave.astype(np.float32)
    n_out = int(round(len(wave) * to_rate / from_rate))
    spec = np.fft.rfft(wave)
    keep = min(len(spec), n_out // 2 + 1)
    out = np.fft.irfft(spec[:keep], n=n_out) * (n_out / len(wave))
    return out.astype(np.float32)
