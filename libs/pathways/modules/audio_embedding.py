"""`audio_embedding` module: waveforms (B, samples) -> log-mel frames -> strided 1-D convolutions
-> hidden states (B, T, D) with learned positions.

The log-mel front end (`pathways.audio`) runs inside the module, in JAX, so a pathway reads raw
audio at a fixed sample rate. Each utterance's log-mel frames are standardised (zero mean, unit
variance over the whole utterance: loudness does not matter), then `conv_layers` convolutions of
width `kernel_size` and stride `stride` (GELU after each) shorten the frames to positions.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from pathways import audio
from pathways.config import positive_int, positive_number, require
from pathways.modules import registry
from pathways.modules.kind import Kind


@dataclasses.dataclass(frozen=True)
class AudioEmbeddingConfig:
    sample_rate: int  # Hz; the input contract: audio at another rate is refused
    max_samples: int  # the longest waveform read (shorter ones are fine)
    d_model: int
    n_mels: int = 40
    n_fft: int = 512
    win_length: int = 400  # samples per frame (25 ms at 16 kHz)
    hop_length: int = 160  # samples between frames (10 ms at 16 kHz)
    conv_layers: int = 2
    kernel_size: int = 3
    stride: int = 2
    log_floor: float = 1e-5
    init_std: float = 0.02
    kind: str = dataclasses.field(default="audio_embedding", init=False)

    def __post_init__(self):
        for name in ("sample_rate", "max_samples", "d_model", "n_mels", "n_fft", "win_length"):
            positive_int(name, getattr(self, name))
        for name in ("hop_length", "conv_layers", "kernel_size", "stride"):
            positive_int(name, getattr(self, name))
        require(
            self.win_length <= self.n_fft,
            f"win_length ({self.win_length}) must be at most n_fft ({self.n_fft})",
        )
        require(
            self.n_mels <= self.n_fft // 2 + 1,
            f"n_mels ({self.n_mels}) must be at most n_fft // 2 + 1 ({self.n_fft // 2 + 1})",
        )
        require(
            self.max_samples >= self.win_length,
            f"max_samples ({self.max_samples}) must hold one window (win_length "
            f"{self.win_length})",
        )
        positive_number("log_floor", self.log_floor)
        positive_number("init_std", self.init_std)

    def frames(self, n_samples: int) -> int:
        """Log-mel frames of a waveform of `n_samples`."""
        return audio.n_frames(n_samples, self.win_length, self.hop_length)

    def positions_of(self, n_samples: int) -> int:
        """Positions (hidden states) a waveform of `n_samples` becomes."""
        t = self.frames(n_samples)
        for _ in range(self.conv_layers):
            t = math.ceil(t / self.stride)
        return t

    def input_positions(self, n_samples: int) -> int:
        """What a call of `n_samples` costs in positions (module servers' max_call_tokens):
        its log-mel frames, the longest sequence the module computes on."""
        return self.frames(n_samples)

    @property
    def output_length(self) -> int:
        """Positions of the longest waveform (checked against the next modules' max_seq_len)."""
        return self.positions_of(self.max_samples)

    @property
    def input_contract(self) -> tuple[str, int]:
        return ("audio", self.sample_rate)

    @property
    def output_contract(self) -> tuple[str, int]:
        return ("hidden", self.d_model)


class AudioEmbedding(nnx.Module):
    def __init__(self, cfg: AudioEmbeddingConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        widths = [cfg.n_mels] + [cfg.d_model] * cfg.conv_layers
        self.convs = nnx.List(
            [
                nnx.Conv(
                    a,
                    b,
                    kernel_size=(cfg.kernel_size,),
                    strides=(cfg.stride,),
                    padding="SAME",
                    rngs=rngs,
                )
                for a, b in zip(widths, widths[1:])
            ]
        )
        init = nnx.initializers.normal(cfg.init_std)
        self.positions = nnx.Param(init(rngs.params(), (cfg.output_length, cfg.d_model)))

    def features(self, wave_bs: jax.Array) -> jax.Array:
        """Standardised log-mel frames (B, T, n_mels)."""
        cfg = self.cfg
        lm_btm = audio.log_mel(
            wave_bs,
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            win_length=cfg.win_length,
            hop_length=cfg.hop_length,
            n_mels=cfg.n_mels,
            floor=cfg.log_floor,
        )
        mean = lm_btm.mean(axis=(1, 2), keepdims=True)
        std = lm_btm.std(axis=(1, 2), keepdims=True)
        return (lm_btm - mean) / (std + 1e-5)

    def __call__(self, wave_bs: jax.Array) -> jax.Array:
        cfg = self.cfg
        if wave_bs.ndim != 2 or not cfg.win_length <= wave_bs.shape[1] <= cfg.max_samples:
            raise ValueError(
                f"audio_embedding expects waveforms of shape (B, samples) with "
                f"{cfg.win_length} <= samples <= max_samples {cfg.max_samples} (mono, "
                f"{cfg.sample_rate} Hz); got {tuple(wave_bs.shape)}"
            )
        x_btd = self.features(wave_bs)
        for conv in self.convs:
            x_btd = jax.nn.gelu(conv(x_btd))
        t = x_btd.shape[1]
        return x_btd + self.positions[...][None, :t]  # (B, T, D)

    def step(
        self,
        wave_bs,
        positions=None,
        cache=None,
        slots=None,
        window=None,
        causal=True,
    ):
        """The kind's one step (see `modules.kind`): positions follow from the waveform's
        length, so `positions` is unused; no cache."""
        return self(wave_bs), None


KIND = registry.register(
    Kind(
        "audio_embedding",
        AudioEmbeddingConfig,
        AudioEmbedding,
        details=lambda c: f"{c.sample_rate} Hz, <= {c.max_samples} samples, {c.n_mels} mels, "
        f"{c.conv_layers} conv x stride {c.stride}, {c.output_length} positions",
    )
)
