"""Consecutive modules in one process as one engine, their steps one compiled program: how
sessions are stepped, in-process and in a module server.

Each module stays its own `ModuleEngine` (its own parameters, checkpoint entry and KV-cache
pool); only a session step through all of them compiles as one program (`runtime.fused_step`),
so XLA schedules across the module boundaries and a step costs one dispatch, not one per module.
`LocalExecutor` steps each pathway through one (`run`); a module server serves its module, or
several (`--module attn-lower,attn-upper`), through one, with the chain's contract (the first
module's input, the last one's output): `prefill` and `decode` (sessions' steps concatenated by
the batcher) are the server's steps.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pathways.executor.base import bucket, padded_length, prompt_positions
from pathways.modules import registry
from pathways.runtime import fused_step
from pathways.sampling import SamplingBatch
from pathways.serving.engine import ModuleEngine, pad_axis
from pathways.serving.limits import ProgramCap
from pathways.serving.sessions import ServerSession


@dataclasses.dataclass
class Step:
    """One session's rows of one decode step (the unit the batcher concatenates)."""

    session: ServerSession
    x: np.ndarray  # (B, 1) int32 tokens or (B, 1, D) float32
    positions: np.ndarray  # (B,) int32
    steps: np.ndarray  # (B,) int32, decoding modules only


@dataclasses.dataclass(frozen=True)
class ChainKind:
    """What the servicer asks of a kind, for a chain: a head when its last module is one, a
    cache when any module keeps one."""

    name: str
    is_head: bool
    has_cache: bool


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    """A chain's contract as a module config shows it (Describe, limits, warm-up)."""

    modules: tuple[str, ...]
    input_contract: tuple[str, int]
    output_contract: tuple[str, int]
    max_seq_len: int


def check_contracts(modules: list[tuple[str, object]]) -> None:
    """Raises ValueError unless each module (name, config) reads what the one before it writes
    and only the last one is a head."""
    if not modules:
        raise ValueError("a chain needs at least one module")
    for (a, ca), (b, cb) in zip(modules, modules[1:]):
        kind = registry.of(ca)
        if kind.is_head:
            raise ValueError(
                f"module {a!r} is a {kind.name} head: no module can follow it in one chain "
                f"({b!r} does)"
            )
        if tuple(ca.output_contract) != tuple(cb.input_contract):
            raise ValueError(
                f"module {b!r} reads {tuple(cb.input_contract)} but {a!r} before it writes "
                f"{tuple(ca.output_contract)}"
            )


class ChainEngine:
    """Consecutive modules' engines, stepped as one program (see the module docstring).

    Sessions hold the same slot numbers in every cached module's pool: the pools are grown to
    the same capacity (`ModuleEngine(slots=...)`, or `take` in-process)."""

    def __init__(self, engines: list[ModuleEngine]):
        check_contracts([(e.name, e.cfg) for e in engines])
        self.engines = list(engines)
        self.names = tuple(e.name for e in engines)
        self.name = "+".join(self.names)
        first, last = engines[0], engines[-1]
        self.kind = ChainKind(
            "+".join(e.kind.name for e in engines),
            last.kind.is_head,
            any(e.kind.has_cache for e in engines),
        )
        self.max_seq_len = min((e.max_seq_len for e in engines if e.max_seq_len), default=0)
        # One module: its own config (Describe shows it; limits read its fields, e.g. an audio
        # embedding's input_positions); several: the chain's contract.
        self.cfg = (
            first.cfg
            if len(engines) == 1
            else ChainConfig(
                self.names,
                tuple(first.cfg.input_contract),
                tuple(last.cfg.output_contract),
                self.max_seq_len,
            )
        )
        self.cached = [e for e in engines if e.kind.has_cache]
        self.programs = ProgramCap(None)
        # prefill -> (the modules' parameter versions, the fused program, its parameter leaves):
        # looked up once per parameter change, not per step.
        self._plans: dict[bool, tuple] = {}

    # ---- what the module engine's users read ------------------------------------------------
    @property
    def capacity(self) -> int:
        return min((e.capacity for e in self.cached), default=0)

    @property
    def kv_bytes(self) -> int:
        return sum(e.kv_bytes for e in self.engines)

    def activation_bytes(self, rows: int, positions: int, window: int = 0) -> int:
        # One program: the modules' intermediates may be live together.
        return sum(e.activation_bytes(rows, positions, window) for e in self.engines)

    def check_input(self, x: np.ndarray, field: str, rows: int | None, t: int | None = None):
        self.engines[0].check_input(x, field, rows, t)

    # ---- the fused step ----------------------------------------------------------------------
    def _plan(self, prefill: bool):
        versions = tuple(e.rt.version for e in self.engines)
        plan = self._plans.get(prefill)
        if plan is None or plan[0] != versions:
            rts = [e.rt for e in self.engines]
            leaves = [rt._serving_flat(prefill)[0] for rt in rts]
            plan = self._plans[prefill] = (versions, fused_step(rts, prefill), leaves)
        return plan[1], plan[2]

    def run(self, x, positions, slots, last, sampling, steps, *, window, draw, with_logits):
        """One step of every module as one program; the pools are updated in place.

        `slots`: the session rows' slots, one entry per cached module (the same numbers in each;
        a caller may keep them on the device); `last`, `sampling` ((temperature, top_k, top_p,
        seed)) and `steps` are the head's (None without one). Returns (output, logits or None):
        the head's tokens, or the last module's hidden states."""
        step, leaves = self._plan(x.shape[1] > 1)
        temperature, top_k, top_p, seed = sampling if sampling is not None else (None,) * 4
        out, logits, caches = step(
            leaves,
            [e.cache for e in self.cached],
            x,
            positions,
            slots,
            last,
            temperature,
            top_k,
            top_p,
            seed,
            steps,
            window=window,
            draw=draw,
            with_logits=with_logits,
        )
        for e, cache in zip(self.cached, caches):
            e.cache = cache
        return out, logits

    # ---- a server's steps: sessions' prefill chunks and (batched) decode steps ---------------
    def prefill(self, s: ServerSession, x, starts, lengths, steps, want_logits: bool):
        """One prefill chunk of session `s` through every module (one program): x (B, T) rows
        of `lengths` real positions from `starts` on; `steps` the head's. Returns (output,
        logits or None): (B, T, D) hidden states, or the head's (B,) tokens."""
        t, pad = x.shape[1], s.max_seq_len
        # Lengths padded to the buckets clients use (executor.base.pad_prompts), so a client
        # sending every length from 1 to max_seq_len compiles ~log2(max_seq_len) programs, not
        # one each; padding positions are dropped and their outputs cut off.
        tp = padded_length(t, pad)
        x = pad_axis(x, 1, tp)
        positions = prompt_positions(starts, lengths, tp, pad)
        window = self._window(int(positions[positions < pad].max()) + 1, pad)
        self.programs.admit(("chain prefill", x.shape, x.dtype.str, window))
        out, logits = self._step(
            x, positions, s.slots, np.asarray(lengths, np.int32) - 1, s.sampling, steps,
            window, want_logits,
        )  # fmt: skip
        if self.kind.is_head:
            return np.asarray(out), None if logits is None else np.asarray(logits)
        return np.asarray(out)[:, :t], None

    def decode(self, items: list[Step], want_logits: bool):
        """One decode step for several sessions at once (the batcher's), through every module
        in one program; per-item (output, logits). A lone session runs at its own batch size
        (what the local executor computes); a mixed batch pads to a power of two so few
        programs get compiled."""
        one = len(items) == 1
        sizes = [it.session.batch_size for it in items]
        cat = (lambda xs: xs[0]) if one else np.concatenate
        x = cat([it.x for it in items])
        pos = cat([it.positions for it in items])
        slots = cat([it.session.slots for it in items]) if self.cached else None
        r = len(pos)
        p = r if one else bucket(r, limit=1 << 30, minimum=1)
        limit = max(it.session.max_seq_len for it in items)
        sampling = steps = None
        if self.kind.is_head:
            sessions = [it.session.sampling for it in items]
            sampling = sessions[0] if one else _concat_sampling(sessions)
            steps = cat([it.steps for it in items])
        if p > r:  # padding rows sit past every real position (a cache drops their writes)
            x = np.concatenate([x, np.zeros((p - r, *x.shape[1:]), x.dtype)])
            pos = np.concatenate([pos, np.full(p - r, self.max_seq_len or limit, np.int32)])
            if slots is not None:
                slots = np.concatenate([slots, np.zeros(p - r, np.int32)])
            if sampling is not None:
                sampling = _concat_sampling([sampling, _greedy(p - r)])
                steps = np.concatenate([steps, np.zeros(p - r, np.int32)])
        window = self._window(int(pos[:r].max()) + 1, limit)
        self.programs.admit(("chain decode", x.shape, x.dtype.str, window))
        out, logits = self._step(
            x, pos[:, None], slots, np.zeros(p, np.int32), sampling, steps, window, want_logits
        )
        out = np.asarray(out)
        logits = None if logits is None else np.asarray(logits)
        if one:
            return [(out[:r], None if logits is None else logits[:r])]
        results, at = [], 0
        for n in sizes:
            results.append((out[at : at + n], None if logits is None else logits[at : at + n]))
            at += n
        return results

    def _window(self, top: int, limit: int) -> int:
        """The cache positions a step attends to (`top` and below, bucketed); 0 in a chain
        without a cache, whose program does not depend on it (compiled once, not per window)."""
        return bucket(top, limit) if self.cached else 0

    def _step(self, x, positions, slots, last, sampling, steps, window, want_logits):
        rows = [slots] * len(self.cached)
        if not self.kind.is_head:
            return self.run(
                x, positions, rows, None, None, None, window=window, draw=False, with_logits=False
            )
        s = sampling
        return self.run(
            x,
            positions,
            rows,
            last,
            (s.temperature, s.top_k, s.top_p, s.seed),
            np.asarray(steps, np.int32),
            window=window,
            draw=bool((s.temperature > 0).any()),
            with_logits=want_logits,
        )

    def forward(self, x, causal: bool = True, modules: int | None = None):
        """The stateless forward through the first `modules` modules (all by default), each
        padded and cut as `ModuleEngine.forward` does."""
        for e in self.engines[: modules or len(self.engines)]:
            x = e.forward(x, causal)
        return x


def _greedy(n: int) -> SamplingBatch:
    return SamplingBatch(
        np.zeros(n, np.float32),
        np.zeros(n, np.int32),
        np.ones(n, np.float32),
        np.zeros(n, np.uint32),
    )


def _concat_sampling(batches: list[SamplingBatch]) -> SamplingBatch:
    return SamplingBatch(*(np.concatenate(cols) for cols in zip(*(b.as_tuple() for b in batches))))
