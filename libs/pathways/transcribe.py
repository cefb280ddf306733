"""Transcribing with a speech pathway in this process: a mono waveform -> its text, through every
module's stateless step (bidirectional, as trained) and the CTC head's greedy or beam decoding."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from pathways import checkpoint as ckpt
from pathways.executor.local import LocalExecutor
from pathways.modules.ctc import beam_decode, greedy_decode
from pathways.runtime import composite_forward


def load_executor(checkpoint: str | Path, pathway: str | None = None) -> LocalExecutor:
    """A LocalExecutor with the checkpoint's spec and the saved weights of `pathway`'s modules
    (every module of the spec when None); ValueError naming modules without weights."""
    spec, _ = ckpt.load_spec(checkpoint)
    needed = spec.pathway(pathway).modules if pathway else tuple(spec.modules)
    missing = [m for m in needed if not ckpt.has_module(checkpoint, m)]
    if missing:
        raise ValueError(
            f"checkpoint {checkpoint} has no weights for module(s) {', '.join(missing)}"
        )
    return LocalExecutor(spec, checkpoint=checkpoint)


def speech_pathway(spec, pathway: str | None = None) -> str:
    """`pathway`, checked to read audio and end in a CTC head, or the spec's only such pathway."""
    reads = {
        name: (spec.modules[p.modules[0]].input_contract[0], spec.modules[p.modules[-1]])
        for name, p in spec.pathways.items()
    }
    if pathway is None:
        found = [n for n, (i, head) in reads.items() if i == "audio" and _is_ctc(head)]
        if len(found) != 1:
            raise ValueError(
                f"name the pathway to transcribe with: the spec has {len(found)} speech pathways "
                f"({', '.join(found) or 'none'})"
            )
        return found[0]
    if pathway not in reads:
        raise ValueError(f"unknown pathway {pathway!r}; known: {', '.join(reads)}")
    first, head = reads[pathway]
    if first != "audio" or not _is_ctc(head):
        raise ValueError(
            f"pathway {pathway!r} reads {first} and outputs {head.output_contract[0]}; "
            f"transcribing needs one that reads audio and outputs characters"
        )
    return pathway


def _is_ctc(head_cfg) -> bool:
    return head_cfg.output_contract[0] == "characters" and hasattr(head_cfg, "alphabet")


class Transcriber:
    """A speech pathway as one jitted program over its modules' current parameters (read on
    every call, so it follows training). Every waveform is zero-padded to the embedding's
    `max_samples` (as in training), so one compiled program serves every length.

    Args:
        source: a LocalExecutor, or a checkpoint directory (its spec and weights are loaded).
        pathway: the pathway's name; None picks the spec's only speech pathway.
        beam: 0 or 1 decodes greedily; larger, prefix beam search keeping `beam` prefixes.
    """

    def __init__(
        self,
        source: LocalExecutor | str | Path,
        pathway: str | None = None,
        beam: int = 0,
        batch_size: int = 64,
    ):
        if isinstance(source, LocalExecutor):
            ex = source
            self.pathway = speech_pathway(ex.spec, pathway)
        else:
            spec, _ = ckpt.load_spec(source)
            self.pathway = speech_pathway(spec, pathway)
            ex = load_executor(source, self.pathway)
        self.executor = ex
        self.chain = ex.chain(self.pathway)
        self.embedding, self.head = self.chain[0].cfg, self.chain[-1].cfg
        self.sample_rate, self.max_samples = self.embedding.sample_rate, self.embedding.max_samples
        if not isinstance(beam, int) or beam < 0:
            raise ValueError(f"beam must be a non-negative integer, got {beam!r}")
        self.beam, self.batch_size = beam, batch_size
        causal = ex.spec.pathway(self.pathway).causal
        forward = functools.partial(composite_forward, self.chain, causal=causal)
        self._log_probs = jax.jit(lambda states, x: jax.nn.log_softmax(forward(states, x), -1))

    def check(self, waveform, sample_rate: int) -> np.ndarray:
        """The waveform as float32 (samples,), or ValueError naming what is wrong: its sample
        rate, shape (mono only), length or values."""
        if sample_rate != self.sample_rate:
            raise ValueError(
                f"sample rate {sample_rate} Hz: pathway {self.pathway!r} reads "
                f"{self.sample_rate} Hz audio"
            )
        w = np.asarray(waveform)
        if w.ndim == 2 and w.shape[1] == 1:
            w = w[:, 0]
        if w.ndim != 1:
            raise ValueError(f"waveform must be mono, shape (samples,); got shape {w.shape}")
        if w.dtype == np.int16:
            w = w.astype(np.float32) / 32768.0
        elif not np.issubdtype(w.dtype, np.floating):
            raise ValueError(f"waveform must be float (or int16 PCM); got dtype {w.dtype}")
        lo = self.embedding.win_length
        if not lo <= len(w) <= self.max_samples:
            raise ValueError(
                f"waveform has {len(w)} samples ({len(w) / sample_rate:.3f} s); pathway "
                f"{self.pathway!r} reads {lo} to {self.max_samples} samples "
                f"({self.max_samples / sample_rate:.3f} s at {sample_rate} Hz)"
            )
        if not np.isfinite(w).all():
            raise ValueError("waveform has NaN or infinite samples")
        return w.astype(np.float32)

    def log_probs(self, waveforms: list[np.ndarray]) -> np.ndarray:
        """(N, T, symbols) log-probabilities of checked float32 waveforms (each zero-padded)."""
        states = [rt.state for rt in self.chain]
        out = []
        for i in range(0, len(waveforms), self.batch_size):
            chunk = waveforms[i : i + self.batch_size]
            x = np.zeros((self.batch_size, self.max_samples), np.float32)
            for j, w in enumerate(chunk):
                x[j, : len(w)] = w
            out.append(np.asarray(self._log_probs(states, x))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, 0, self.head.n_symbols), np.float32)

    def decode(self, log_probs_tc: np.ndarray) -> str:
        if self.beam > 1:
            return self.head.decode(beam_decode(log_probs_tc, self.beam)[0])
        return self.head.decode(greedy_decode(log_probs_tc))

    def transcribe(self, waveform: np.ndarray, sample_rate: int) -> str:
        """The text of one mono waveform at `sample_rate` (ValueError on bad input)."""
        return self.transcribe_many([waveform], sample_rate)[0]

    def transcribe_many(self, waveforms, sample_rate: int) -> list[str]:
        """The texts of several waveforms, computed in batches."""
        checked = [self.check(w, sample_rate) for w in waveforms]
        return [self.decode(lp) for lp in self.log_probs(checked)]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions of characters."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (ca != cb))
    return row[-1]


def error_rates(hypotheses: list[str], references: list[str]) -> dict:
    """Character error rate (edits over reference characters, summed over utterances) and word
    accuracy (the share of utterances transcribed exactly)."""
    if len(hypotheses) != len(references) or not references:
        raise ValueError(
            f"need as many hypotheses as references, at least one; got {len(hypotheses)} "
            f"and {len(references)}"
        )
    edits = sum(edit_distance(h, r) for h, r in zip(hypotheses, references))
    chars = sum(len(r) for r in references)
    exact = sum(h == r for h, r in zip(hypotheses, references))
    return {"cer": edits / max(chars, 1), "word_accuracy": exact / len(references)}
