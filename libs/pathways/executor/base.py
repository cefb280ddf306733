"""The executor interface shared by the local (in-process) and remote (gRPC) implementations."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Protocol

import numpy as np

from pathways.sampling import SamplingBatch, SamplingParams
from pathways.spec import PathwaySpec

_ids = itertools.count()


def bucket(n: int, limit: int, minimum: int = 32) -> int:
    """Rounds n up to a power of two (>= minimum, <= limit) to bound the number of compilations."""
    b = minimum
    while b < n:
        b *= 2
    return min(b, limit)


def padded_length(t: int, limit: int) -> int:
    """The length a call of `t` positions is padded to (8, 16, 32, ... up to `limit`, the
    module's context; never below t): calls of every length compile ~log2(limit) programs."""
    return max(bucket(t, limit=limit, minimum=8), t)


def prompt_positions(starts, lengths, t: int, pad_position: int) -> np.ndarray:
    """(B, t) int32 positions of right-padded prompts: row i's `lengths[i]` positions from
    `starts[i]` on, then `pad_position` (past every real one: a cache drops its writes)."""
    positions = np.full((len(lengths), t), pad_position, np.int32)
    for i, n in enumerate(lengths):
        positions[i, :n] = starts[i] + np.arange(n)
    return positions


@dataclasses.dataclass
class Session:
    """A batch of sequences being generated on one pathway; holds their per-row progress."""

    pathway: str
    sampling: SamplingBatch
    lengths: np.ndarray  # (B,) tokens already in every module's KV cache
    steps: np.ndarray  # (B,) tokens sampled so far (seeds each draw)
    max_seq_len: int
    id: str = dataclasses.field(default_factory=lambda: f"s{next(_ids)}")

    @classmethod
    def new(cls, pathway: str, sampling: list[SamplingParams], max_seq_len: int) -> Session:
        """A session of len(sampling) sequences, nothing generated yet."""
        if not sampling:
            raise ValueError("a session needs at least one sequence (sampling list is empty)")
        b = len(sampling)
        return cls(
            pathway=pathway,
            sampling=SamplingBatch.of(sampling),
            lengths=np.zeros(b, np.int32),
            steps=np.zeros(b, np.int32),
            max_seq_len=max_seq_len,
        )

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def check_prompts(self, prompts: list[list[int]]) -> np.ndarray:
        """Validates a prefill's prompts (one non-empty prompt per row, room left); returns
        their lengths."""
        if len(prompts) != self.batch_size:
            raise ValueError(
                f"prefill got {len(prompts)} prompts for a session of "
                f"{self.batch_size} sequences"
            )
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        lengths = np.array([len(p) for p in prompts], np.int32)
        self.check_room(lengths)
        return lengths

    def check_room(self, extra: np.ndarray) -> None:
        """Raises unless every row can take `extra` more tokens within max_seq_len."""
        need = self.lengths + extra
        if need.max() > self.max_seq_len:
            raise ValueError(
                f"max sequence length exceeded: {int(need.max())} tokens > pathway "
                f"{self.pathway!r} max_seq_len {self.max_seq_len}"
            )


@dataclasses.dataclass
class StepResult:
    tokens: np.ndarray  # (B,) int32 sampled next tokens
    logits: np.ndarray | None = None  # (B, V) float32 logits they were sampled from, on request


class Executor(Protocol):
    """Runs pathways: sessions (prefill/decode with KV caches), stateless forward, loss, grads."""

    spec: PathwaySpec

    def open_session(self, pathway: str, sampling: list[SamplingParams]) -> Session: ...

    def prefill(
        self, session: Session, prompts: list[list[int]], *, return_logits: bool = False
    ) -> StepResult: ...

    def decode(
        self, session: Session, tokens: np.ndarray, *, return_logits: bool = False
    ) -> StepResult: ...

    def close_session(self, session: Session) -> None: ...

    def forward(self, pathway: str, inputs: np.ndarray, *, head: bool = True) -> np.ndarray:
        """Every module's stateless step with the pathway's attention mask: the head's output
        (`head=False`: the hidden states before the head). Inputs: what the first module reads
        (`forward_input`)."""
        ...

    def loss(self, pathway: str, inputs: np.ndarray, targets: np.ndarray) -> float: ...

    def loss_and_grads(self, pathway: str, inputs: np.ndarray, targets: np.ndarray): ...


def forward_input(inputs) -> np.ndarray:
    """A stateless forward's input as modules read it: integers as int32 (tokens), anything
    else as float32 (images, waveforms, activations)."""
    x = np.asarray(inputs)
    return x.astype(np.int32 if np.issubdtype(x.dtype, np.integer) else np.float32, copy=False)


def pad_prompts(prompts: list[list[int]], starts: np.ndarray, pad_position: int):
    """Right-pads prompts to a bucketed length; padding gets position `pad_position` (dropped).

    Returns:
        tokens (B, T) int32, positions (B, T) int32, last_index (B,) int32.
    """
    lengths = np.array([len(p) for p in prompts], np.int32)
    t = padded_length(int(lengths.max()), pad_position)  # nearby lengths share one program
    tokens = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    positions = prompt_positions(starts, lengths, t, pad_position)
    return tokens, positions, lengths - 1
