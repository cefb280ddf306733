"""Sampling on device: greedy, temperature, top-k and top-p, with per-row settings and seeds."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Bounds on a request's stop sequences (the gateway takes them from any client): their number and
# their total length in characters. Matching is linear in the text either way (pathways.stops);
# these bound the matcher's memory.
MAX_STOPS = 16
MAX_STOP_CHARS = 4096


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled. temperature == 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int = 0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if not (isinstance(self.temperature, int | float) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r:.200}")
        if len(self.stop) > MAX_STOPS:
            raise ValueError(
                f"stop has {len(self.stop)} sequences; at most {MAX_STOPS} (MAX_STOPS)"
            )
        if sum(map(len, self.stop)) > MAX_STOP_CHARS:
            raise ValueError(
                f"stop sequences have {sum(map(len, self.stop))} characters in all; at most "
                f"{MAX_STOP_CHARS} (MAX_STOP_CHARS)"
            )
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling settings as arrays, the form the jitted sampler takes."""

    temperature: np.ndarray  # (B,) float32
    top_k: np.ndarray  # (B,) int32
    top_p: np.ndarray  # (B,) float32
    seed: np.ndarray  # (B,) uint32 (the seed folded to 32 bits)

    @staticmethod
    def of(params: list[SamplingParams]) -> SamplingBatch:
        return SamplingBatch(
            temperature=np.array([p.temperature for p in params], np.float32),
            top_k=np.array([p.top_k for p in params], np.int32),
            top_p=np.array([p.top_p for p in params], np.float32),
            # Fold the high half into the low one: seeds differing only above bit 32 differ too.
            seed=np.array([(p.seed ^ (p.seed >> 32)) & 0xFFFFFFFF for p in params], np.uint32),
        )

    def take(self, rows) -> SamplingBatch:
        return SamplingBatch(*(a[rows] for a in dataclasses.astuple(self)))

    def as_tuple(self):
        return dataclasses.astuple(self)


def sample(logits_bv, temperature_b, top_k_b, top_p_b, seed_b, step_b, draw: bool | None = None):
    """Samples one token per row; jittable. step_b makes each step's draw distinct and replayable.

    `draw` (static) says whether any row samples (temperature > 0): False compiles only the
    argmax, True only the draw (greedy rows still take the argmax), None decides on the device.
    Callers that know it (a session's settings are fixed) spare the conditional: on a GPU an
    XLA conditional reads its predicate back to the host on every step."""
    logits = logits_bv.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw_fn():
        needs_filter = jnp.any((top_k_b > 0) | (top_p_b < 1.0))
        scaled = logits / jnp.maximum(temperature_b, 1e-6)[:, None]
        scaled = jax.lax.cond(needs_filter, _filter, lambda x, k, p: x, scaled, top_k_b, top_p_b)
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed_b, step_b)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature_b > 0, drawn, greedy)

    if draw is not None:
        return draw_fn() if draw else greedy
    # An all-greedy batch skips the draw: Gumbel noise over a 50k vocabulary costs more per step
    # than the argmax (about a quarter of the LM head's time for GPT-2 on one CPU core).
    return jax.lax.cond(jnp.any(temperature_b > 0), draw_fn, lambda: greedy)


def _filter(scaled_bv, top_k_b, top_p_b):
    """Masks logits outside each row's top-k and top-p (nucleus) sets."""
    v = scaled_bv.shape[-1]
    sorted_desc = -jnp.sort(-scaled_bv, axis=-1)
    k = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, v), v)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # (B, 1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < p.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = before < top_p_b[:, None]
    n_keep = jnp.maximum(keep_sorted.sum(-1), 1)
    pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    threshold = jnp.maximum(kth, pth)
    return jnp.where(scaled_bv >= threshold, scaled_bv, -jnp.inf)
