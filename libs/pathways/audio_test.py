"""The JAX log-mel front end against a NumPy reference written frame by frame, on test tones."""

import math

import numpy as np
import pytest

from pathways import audio

SR, N_FFT, WIN, HOP, MELS = 16000, 512, 400, 160, 40
ARGS = dict(sample_rate=SR, n_fft=N_FFT, win_length=WIN, hop_length=HOP, n_mels=MELS)


def reference_log_mel(wave, sample_rate, n_fft, win_length, hop_length, n_mels, floor=1e-5):
    """One frame at a time, filters one at a time (HTK mel scale, peak-1 triangles)."""

    def mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    top = mel(sample_rate / 2)
    points = [hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    freqs = [k * sample_rate / n_fft for k in range(n_fft // 2 + 1)]
    fb = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        lo, mid, hi = points[m], points[m + 1], points[m + 2]
        for k, f in enumerate(freqs):
            if lo < f <= mid:
                fb[k, m] = (f - lo) / (mid - lo)
            elif mid < f < hi:
                fb[k, m] = (hi - f) / (hi - mid)
    window = np.hanning(win_length + 1)[:-1]  # periodic Hann
    out = []
    start = 0
    while start + win_length <= len(wave):
        frame = np.zeros(n_fft)
        frame[:win_length] = wave[start : start + win_length] * window
        power = np.abs(np.fft.rfft(frame)) ** 2
        out.append(np.log(np.maximum(power @ fb, floor)))
        start += hop_length
    return np.array(out)


def tone(freq, seconds=0.5, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(SR * seconds)) / SR)).astype(np.float32)


def test_matches_numpy_reference_on_tones_and_noise():
    rng = np.random.default_rng(0)
    waves = np.stack([tone(1000), tone(3100, amp=0.1) + tone(220), rng.normal(0, 0.2, SR // 2)])
    got = np.asarray(audio.log_mel(waves.astype(np.float32), **ARGS))
    assert got.shape == (3, audio.n_frames(SR // 2, WIN, HOP), MELS) == (3, 48, MELS)
    for w, g in zip(waves, got):
        want = reference_log_mel(w.astype(np.float64), SR, N_FFT, WIN, HOP, MELS)
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 4000.0])
def test_tone_peaks_in_the_mel_bin_centred_nearest_it(freq):
    lm = np.asarray(audio.log_mel(tone(freq)[None], **ARGS))[0]  # (T, M)
    centres = audio.mel_to_hz(np.linspace(0, audio.hz_to_mel(SR / 2), MELS + 2))[1:-1]
    assert (lm.argmax(-1) == np.abs(centres - freq).argmin()).all()
    # The peak is far above bins an octave away.
    far = np.abs(centres - 2 * freq).argmin() if 2 * freq < SR / 2 else 0
    assert (lm.max(-1) - lm[:, far] > 5).all()


def test_silence_is_the_floor_and_short_input_is_an_error():
    lm = np.asarray(audio.log_mel(np.zeros((1, 800), np.float32), **ARGS))
    np.testing.assert_allclose(lm, np.log(1e-5), rtol=1e-6)
    with pytest.raises(ValueError, match="399 samples is shorter than one window"):
        audio.log_mel(np.zeros((1, 399), np.float32), **ARGS)


def test_filterbank_is_triangles_of_peak_one():
    fb = audio.mel_filterbank(SR, N_FFT, MELS)
    assert fb.shape == (N_FFT // 2 + 1, MELS)
    assert (fb >= 0).all() and (fb.max(0) > 0.5).all() and (fb.max(0) <= 1.0).all()
    # Neighbouring triangles overlap so that every bin between the first and last centre sums to 1.
    centres = audio.mel_to_hz(np.linspace(0, audio.hz_to_mel(SR / 2), MELS + 2))[1:-1]
    freqs = np.arange(N_FFT // 2 + 1) * SR / N_FFT
    inside = (freqs >= centres[0]) & (freqs <= centres[-1])
    np.testing.assert_allclose(fb[inside].sum(1), 1.0, atol=1e-5)


def test_wav_round_trip_and_the_standard_library_agree():
    import io
    import wave as wave_lib

    x = 0.5 * np.sin(np.linspace(0, 40, 999)).astype(np.float32)
    data = audio.encode_wav(x, 16000)
    got, rate = audio.decode_wav(data)
    assert rate == 16000 and got.dtype == np.float32 and got.shape == (999,)
    np.testing.assert_allclose(got, x, atol=1 / 32767)
    with wave_lib.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    np.testing.assert_array_equal(pcm / 32768.0, got)
    # A data chunk whose size runs past the end (written to a pipe) is read to the end.
    piped = data[:40] + (0x7FFFFFFF).to_bytes(4, "little") + data[44:]
    np.testing.assert_array_equal(audio.decode_wav(piped)[0], got)


def test_bad_wav_files_are_named():
    import io
    import wave as wave_lib

    buf = io.BytesIO()
    with wave_lib.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros(20, "<i2").tobytes())
    with pytest.raises(ValueError, match="WAV has 2 channels; mono audio"):
        audio.decode_wav(buf.getvalue())
    with pytest.raises(ValueError, match="not a WAV file"):
        audio.decode_wav(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(ValueError, match="no data chunk"):
        audio.decode_wav(audio.encode_wav(np.zeros(4), 8000)[:36])


def test_resample_keeps_a_tone():
    sr_in = 22050
    x = np.sin(2 * np.pi * 1000 * np.arange(sr_in) / sr_in)
    y = audio.resample(x, sr_in, SR)
    assert y.shape == (SR,)
    want = np.sin(2 * np.pi * 1000 * np.arange(SR) / SR)
    np.testing.assert_allclose(y[100:-100], want[100:-100], atol=1e-3)
