"""`ctc` head: hidden states (B, T, D) -> per-position character scores (B, T, 1 + alphabet),
trained with the CTC loss; greedy and prefix-beam-search decoding.

Symbol 0 is the CTC blank; symbol i >= 1 is `alphabet[i - 1]`. Targets are labels (B, L) int32
of symbols 1.. padded with 0 at the end (`encode`). Every position of the input counts: shorter
utterances are padded with silence, which the head learns to read as blanks.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pathways.config import one_of, positive_int, positive_number, require
from pathways.modules import registry
from pathways.modules.kind import Kind
from pathways.modules.layers import NORMS, dense, make_norm

BLANK = 0
ENGLISH = "abcdefghijklmnopqrstuvwxyz' "


@dataclasses.dataclass(frozen=True)
class CtcConfig:
    d_model: int
    alphabet: str = ENGLISH
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    init_std: float = 0.02
    kind: str = dataclasses.field(default="ctc", init=False)

    def __post_init__(self):
        positive_int("d_model", self.d_model)
        require(
            isinstance(self.alphabet, str) and len(self.alphabet) > 0,
            f"alphabet must be a non-empty string, got {self.alphabet!r}",
        )
        require(
            len(set(self.alphabet)) == len(self.alphabet),
            f"alphabet must not repeat characters, got {self.alphabet!r}",
        )
        one_of("norm", self.norm, NORMS)
        positive_number("norm_eps", self.norm_eps)
        positive_number("init_std", self.init_std)

    @property
    def n_symbols(self) -> int:
        return len(self.alphabet) + 1

    @property
    def input_contract(self) -> tuple[str, int]:
        return ("hidden", self.d_model)

    @property
    def output_contract(self) -> tuple[str, int]:
        return ("characters", self.n_symbols)

    def encode(self, texts: list[str], length: int) -> np.ndarray:
        """(N, length) int32 labels of `texts`, 0-padded; ValueError naming the text and the
        character outside the alphabet, or a text longer than `length`."""
        index = {c: i + 1 for i, c in enumerate(self.alphabet)}
        out = np.zeros((len(texts), length), np.int32)
        for n, text in enumerate(texts):
            bad = [c for c in text if c not in index]
            if bad:
                raise ValueError(f"text {text!r}: {bad[0]!r} is not in the alphabet")
            if len(text) > length:
                raise ValueError(f"text {text!r} has {len(text)} characters, more than {length}")
            out[n, : len(text)] = [index[c] for c in text]
        return out

    def decode(self, symbols) -> str:
        """Text of symbols (blanks and 0-padding dropped)."""
        return "".join(self.alphabet[int(s) - 1] for s in symbols if int(s) != BLANK)


def ctc_loss(logits_btc: jax.Array, labels_bl: jax.Array) -> jax.Array:
    """Negative log-likelihood (B,) of each label sequence (0-padded) summed over alignments."""
    logit_pad = jnp.zeros(logits_btc.shape[:2], jnp.float32)
    label_pad = (labels_bl == BLANK).astype(jnp.float32)
    return optax.ctc_loss(logits_btc, logit_pad, labels_bl, label_pad, blank_id=BLANK)


class Ctc(nnx.Module):
    def __init__(self, cfg: CtcConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, rngs)
        self.head = dense(cfg.d_model, cfg.n_symbols, bias=True, std=cfg.init_std, rngs=rngs)

    def __call__(self, h_btd: jax.Array) -> jax.Array:
        if h_btd.ndim != 3:
            raise ValueError(f"ctc reads hidden states of shape (B, T, D); got {h_btd.shape}")
        return self.head(self.norm(h_btd)).astype(jnp.float32)  # (B, T, C)

    def step(self, h_btd, positions=None, cache=None, slots=None, window=None, causal=True):
        """The kind's one step (see `modules.kind`): symbol logits (B, T, C); no cache."""
        return self(h_btd), None

    def loss(self, h_btd: jax.Array, labels_bl: jax.Array, mask_b: jax.Array | None = None):
        """Mean CTC loss per utterance over examples where mask is 1 (all if None)."""
        nll = ctc_loss(self(h_btd), labels_bl)
        if mask_b is None:
            return nll.mean()
        mask = mask_b.astype(jnp.float32)
        return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    def log_probs(self, h_btd: jax.Array) -> jax.Array:
        return jax.nn.log_softmax(self(h_btd), axis=-1)


def greedy_decode(log_probs_tc: np.ndarray) -> list[int]:
    """Best symbol per position, repeats collapsed, blanks dropped."""
    best = np.asarray(log_probs_tc).argmax(-1)
    out, prev = [], BLANK
    for s in best.tolist():
        if s != prev and s != BLANK:
            out.append(s)
        prev = s
    return out


def _logsumexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def _add(beams: dict, prefix: tuple, blank: float = -math.inf, sym: float = -math.inf) -> None:
    have = beams.setdefault(prefix, [-math.inf, -math.inf])
    have[0] = _logsumexp(have[0], blank)
    have[1] = _logsumexp(have[1], sym)


def beam_decode(log_probs_tc: np.ndarray, beam: int = 8) -> tuple[list[int], float]:
    """Prefix beam search: the most likely label sequence found keeping `beam` prefixes, and its
    log-probability (summed over the alignments the search kept, exact when nothing was pruned).

    Each prefix carries the log-probability of its alignments so far that end in a blank and of
    those that end in its last symbol; a repeated symbol extends the prefix only after a blank.
    """
    lp = np.asarray(log_probs_tc, np.float64)
    ninf = -math.inf
    beams: dict[tuple, tuple[float, float]] = {(): (0.0, ninf)}  # prefix -> (blank, non-blank)
    for t in range(lp.shape[0]):
        row = lp[t]
        nxt: dict[tuple, list[float]] = {}
        for prefix, (pb, pnb) in beams.items():
            total = _logsumexp(pb, pnb)
            _add(nxt, prefix, blank=total + row[BLANK])
            last = prefix[-1] if prefix else None
            for s in range(lp.shape[1]):
                if s == BLANK:
                    continue
                if s == last:
                    _add(nxt, prefix, sym=pnb + row[s])  # the same symbol held: no new label
                    _add(nxt, prefix + (s,), sym=pb + row[s])  # after a blank: a new label
                else:
                    _add(nxt, prefix + (s,), sym=total + row[s])
        ranked = sorted(nxt.items(), key=lambda kv: -_logsumexp(*kv[1]))
        beams = {p: (v[0], v[1]) for p, v in ranked[:beam]}
    best, (pb, pnb) = max(beams.items(), key=lambda kv: _logsumexp(*kv[1]))
    return list(best), _logsumexp(pb, pnb)


KIND = registry.register(
    Kind(
        "ctc",
        CtcConfig,
        Ctc,
        is_head=True,
        details=lambda c: f"CTC over {c.n_symbols} symbols (blank + {c.alphabet!r}), {c.norm}",
    )
)
