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
