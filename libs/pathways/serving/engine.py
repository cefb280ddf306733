"""One module's compute for sessions: its runtime (`ModuleRuntime`, the jitted entry points) and
a pool of KV-cache slots; no model math of its own.

The same engine steps sessions for a module server (a fixed pool; its `SessionTable` hands slots
out, and `Batcher` concatenates sessions into one decode step) and in-process (`LocalExecutor`
is a chain of engines: `take`/`give` hand slots out and the pool grows on demand, and co-located
engines' steps fuse into one program, `runtime.fused_step`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from pathways import checkpoint as ckpt
from pathways import modules as mod
from pathways import sharding
from pathways.executor.base import bucket
from pathways.runtime import ModuleRuntime, streams_weights
from pathways.sampling import SamplingBatch
from pathways.serving.errors import InvalidArgument
from pathways.serving.limits import ProgramCap
from pathways.serving.sessions import ServerSession


@dataclasses.dataclass
class Step:
    """One session's rows of one decode step (the unit the batcher concatenates)."""

    session: ServerSession
    x: np.ndarray  # (B, 1) int32 tokens or (B, 1, D) float32
    positions: np.ndarray  # (B,) int32
    steps: np.ndarray  # (B,) int32, decoding modules only


class ModuleEngine:
    """One module's runtime and KV-cache pool (kinds with a cache: `slots` rows, each one
    sequence; the pool is a pytree whose leaves have the slot on axis 1, see `modules.kind`).

    `weights`, `native` and `mesh` are the runtime's (`ModuleRuntime`; on a mesh the cache is
    split by the kind's `cache_partition`); `seed` initialises parameters when no `state` is
    given.
    """

    def __init__(
        self,
        name: str,
        cfg: mod.ModuleConfig,
        state=None,
        slots: int = 0,
        weights: str = "float32",
        native: bool | None = None,
        seed: int = 0,
        mesh=None,
    ):
        # Given a state (a checkpoint's), the module is built around it, never initialised.
        module = mod.build(cfg, seed=seed) if state is None else mod.from_state(cfg, state)
        self.rt = ModuleRuntime(name, cfg, module, weights=weights, native=native, mesh=mesh)
        self.name, self.cfg, self.kind = name, cfg, self.rt.kind
        self.cache, self.capacity, self._free = None, 0, []
        if self.kind.has_cache and slots:
            self._grow(slots)
        self.max_seq_len = getattr(cfg, "max_seq_len", 0)
        # Distinct shapes this engine has compiled (a module server caps them; in-process: none).
        self.programs = ProgramCap(None)

    @classmethod
    def from_checkpoint(
        cls,
        name: str,
        cfg,
        directory,
        slots: int = 0,
        weights: str = "float32",
        native=None,
        mesh=None,
    ) -> ModuleEngine:
        """The engine of module `name` with the weights the checkpoint `directory` holds,
        never initialised first. Stored as bfloat16/int8 (off a mesh), they are read a few
        arrays at a time and converted as read (`checkpoint.stream_module`): the process never
        holds the float32 weights whole. Otherwise they are read whole into the module's
        abstract shapes (`checkpoint.restore_module`), the one float32 copy being the weights."""
        if streams_weights(weights, mesh):
            shapes = nnx.state(mod.abstract(cfg))  # no arrays: filled by the stream below
            engine = cls(name, cfg, shapes, slots, weights, native, mesh=mesh)
            engine.rt.load_serving(ckpt.stream_module(directory, name, cfg))
            return engine
        state = ckpt.restore_module(directory, name, cfg)
        return cls(name, cfg, state, slots, weights, native, mesh=mesh)

    # ---- the slot pool -----------------------------------------------------------------------
    def take(self, n: int) -> np.ndarray:
        """n free slots for an in-process session (the pool grows when too few are free).

        A reused slot keeps its previous session's keys/values: a position is only attended to
        after its session has written it (the causal mask is by position), so no zeroing."""
        if len(self._free) < n:
            self._grow(self.capacity + n - len(self._free))
        return np.array([self._free.pop() for _ in range(n)], np.int32)

    def give(self, slots) -> None:
        """Returns a closed session's slots to the pool."""
        self._free.extend(int(s) for s in reversed(slots))

    def _grow(self, capacity: int) -> None:
        new = self.kind.empty_cache(self.cfg, capacity)
        if self.cache is not None:  # sessions keep their slots: copy what they wrote
            new = jax.tree.map(lambda n, o: n.at[:, : o.shape[1]].set(o), new, self.cache)
        if self.rt.mesh is not None:
            rule, what = self.kind.cache_partition, f"{self.name}/cache/"
            new = sharding.place(new, sharding.plan(rule, self.cfg, new, self.rt.mesh, what))
        # Free slots are popped from the end: the old free ones first, then the new, lowest first.
        self._free = list(range(capacity - 1, self.capacity - 1, -1)) + self._free
        self.cache, self.capacity = new, capacity

    def step(self, x, positions, slots=None, *, window: int | None = None):
        """The module's step for the sessions in `slots` (prefill or decode, attending to the
        first `window` positions; the pool is updated in place), or the stateless forward for
        kinds without a cache."""
        if self.cache is None:
            self.programs.admit(("forward", x.shape, x.dtype.str))
            return self.rt.step(x, positions)[0]
        n = None if slots is None else len(slots)
        self.programs.admit(("step", x.shape, x.dtype.str, positions.shape, n, window))
        y, self.cache = self.rt.step(x, positions, self.cache, slots, window=window)
        return y

    def activation_bytes(self, rows: int, positions: int, window: int = 0) -> int:
        """An estimate of the memory one step of `rows` x `positions` allocates while it runs
        (float32 activations a few times the width, attention scores against `window` cached
        positions, a head's logits); what the memory budget reserves for a call."""
        cfg = self.cfg
        widths = [d for k, d in (cfg.input_contract, cfg.output_contract) if k != "tokens"]
        width = max(widths or [getattr(cfg, "d_model", 1)])
        n = rows * positions
        total = n * width * 4 * 16  # residual stream, q/k/v, the MLP's 4x hidden, copies
        total += n * max(window, positions) * getattr(cfg, "n_heads", 0) * 4 * 2
        if self.kind.is_head:
            total += rows * cfg.output_contract[1] * 4 * 4  # logits, probabilities, sort
        return total

    @property
    def kv_bytes(self) -> int:
        return 0 if self.cache is None else sum(int(a.nbytes) for a in self.cache.values())

    # ---- validation --------------------------------------------------------------------------
    def check_input(self, x: np.ndarray, field: str, rows: int | None, t: int | None = None):
        kind, dim = self.cfg.input_contract
        if kind == "tokens":
            if x.dtype != np.int32 or x.ndim != 2:
                raise InvalidArgument(
                    f"{field} must be int32 tokens of shape (B, T) for "
                    f"{self.kind} module {self.name!r}; got {x.dtype} "
                    f"{list(x.shape)}"
                )
            if x.size and (int(x.min()) < 0 or int(x.max()) >= dim):
                bad = x[(x < 0) | (x >= dim)]
                raise InvalidArgument(
                    f"{field} has token id {int(bad[0])} outside "
                    f"[0, {dim}) (vocab_size of {self.name!r})"
                )
        elif kind != "hidden":  # images, waveforms: the kind checks its own shape (forward)
            if x.dtype != np.float32:
                raise InvalidArgument(
                    f"{field} must be float32 {kind} input for {self.kind} module "
                    f"{self.name!r}; got {x.dtype} {list(x.shape)}"
                )
            if x.size and not np.isfinite(x).all():
                raise InvalidArgument(f"{field} has NaN or infinite values")
        else:
            if x.dtype != np.float32 or x.ndim != 3:
                raise InvalidArgument(
                    f"{field} must be float activations of shape "
                    f"(B, T, {dim}) for {self.kind} module {self.name!r}; "
                    f"got {x.dtype} {list(x.shape)}"
                )
            if x.shape[2] != dim:
                raise InvalidArgument(
                    f"{field} has d_model {x.shape[2]} but module "
                    f"{self.name!r} expects d_model {dim}"
                )
        if rows is not None and x.shape[0] != rows:
            raise InvalidArgument(f"{field} has batch {x.shape[0]} but the session has {rows} rows")
        if t is not None and x.shape[1] != t:
            raise InvalidArgument(f"{field} has {x.shape[1]} positions; expected {t}")
        if x.shape[1] == 0 or x.shape[0] == 0:
            raise InvalidArgument(f"{field} is empty: shape {list(x.shape)}")

    # ---- steps -------------------------------------------------------------------------------
    def prefill(self, s: ServerSession, x, starts, lengths, steps, want_logits: bool):
        """Returns (output, logits or None); output is (B, T, D) or (B,) tokens for a head."""
        b, t = x.shape[:2]
        pad = s.max_seq_len
        # Lengths padded to the buckets clients use (executor.base.pad_prompts), so a client
        # sending every length from 1 to max_seq_len compiles ~log2(max_seq_len) programs,
        # not one each; padding positions are dropped and their outputs cut off.
        tp = max(bucket(t, limit=pad, minimum=8), t)
        x = _pad_axis(x, 1, tp)
        positions = np.full((b, tp), pad, np.int32)
        for i in range(b):
            positions[i, : lengths[i]] = starts[i] + np.arange(lengths[i])
        if self.kind.is_head:
            return self._head(x, lengths - 1, s.sampling, steps, want_logits)
        # numpy arguments go straight into the jitted call: jnp.asarray would dispatch an eager
        # device_put per array first (~0.1 ms each, on every hop of every token).
        if self.cache is None:
            return np.asarray(self.step(x, positions))[:, :t], None
        real = positions[positions < pad]
        window = bucket(int(real.max()) + 1, s.max_seq_len)
        y = self.step(x, positions, s.slots, window=window)
        return (y if tp == t else np.asarray(y)[:, :t]), None

    def decode(self, items: list[Step], want_logits: bool):
        """One decode step for several sessions at once; returns per-item (output, logits)."""
        one = len(items) == 1  # a lone session: nothing to concatenate
        sizes = [it.session.batch_size for it in items]
        x = items[0].x if one else np.concatenate([it.x for it in items])
        pos = items[0].positions if one else np.concatenate([it.positions for it in items])
        r = len(pos)
        # A lone session runs at its own batch size (identical to the local executor); a mixed
        # batch pads to a power of two so few programs get compiled.
        p = r if one else bucket(r, limit=1 << 30, minimum=1)
        limit = max(it.session.max_seq_len for it in items)
        if self.kind.is_head:
            if one:
                sampling, steps = items[0].session.sampling, items[0].steps
            else:
                sampling = _concat_sampling([it.session.sampling for it in items])
                steps = np.concatenate([it.steps for it in items])
            if p > r:
                x = np.concatenate([x, np.zeros((p - r, *x.shape[1:]), x.dtype)])
                steps = np.concatenate([steps, np.zeros(p - r, np.int32)])
                sampling = _concat_sampling([sampling, _greedy(p - r)])
            out, logits = self._head(x, np.zeros(p, np.int32), sampling, steps, want_logits)
        else:
            if p > r:  # padding rows sit past every real position (a cache drops their writes)
                x = np.concatenate([x, np.zeros((p - r, *x.shape[1:]), x.dtype)])
                pos = np.concatenate([pos, np.full(p - r, self.max_seq_len or limit, np.int32)])
            positions = pos[:, None]
            if self.cache is None:
                out = self.step(x, positions)
            else:
                slots = (
                    items[0].session.slots
                    if one
                    else np.concatenate(
                        [it.session.slots for it in items] + [np.zeros(p - r, np.int32)]
                    )
                )
                window = bucket(int(pos[:r].max()) + 1, limit)
                out = self.step(x, positions, slots, window=window)
            logits = None
        out = np.asarray(out)
        logits = np.asarray(logits) if logits is not None else None
        if one:
            return [(out, logits)]
        results, at = [], 0
        for n in sizes:
            results.append((out[at : at + n], None if logits is None else logits[at : at + n]))
            at += n
        return results

    def forward(self, x, causal: bool = True):
        """A stateless forward with the call's attention mask. The batch is padded to a power
        of two and so is the length where padding cannot change the real positions (a causal
        call over positions that stay positions), cut off after: the shapes clients send
        compile a bounded number of programs. A bidirectional call would attend to padding
        and a pooling head would average it, so their lengths are kept."""
        b, t = x.shape[:2]
        bp = bucket(b, limit=1 << 30, minimum=1)
        x = _pad_axis(x, 0, bp)
        per_position = self.cfg.input_contract[0] in ("tokens", "hidden") and (
            self.cfg.output_contract[0] in ("hidden", "logits")
        )
        if causal and per_position:
            tp = max(bucket(t, limit=self.max_seq_len or 1 << 30, minimum=8), t)
            x = _pad_axis(x, 1, tp)
        else:
            tp = t
        positions = np.broadcast_to(np.arange(tp, dtype=np.int32), (bp, tp))
        self.programs.admit(("stateless forward", x.shape, x.dtype.str))
        try:
            out = self.rt.forward(self.rt.state, x, positions, causal=causal)
        except ValueError as e:  # a kind's own shape check (images), raised while tracing
            raise InvalidArgument(f"input: {e}") from None
        out = np.asarray(out)[:b]
        return out[:, :t] if per_position else out

    def _head(self, x, last, sampling: SamplingBatch, steps, want_logits):
        s = sampling
        self.programs.admit(("head", x.shape, x.dtype.str))
        out, logits = self.rt.serve_head(
            x,
            np.asarray(last, np.int32),
            s.temperature,
            s.top_k,
            s.top_p,
            s.seed,
            np.asarray(steps, np.int32),
        )
        return out, (logits if want_logits else None)


def _pad_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """x zero-padded along `axis` to `size` (x itself when it is that long)."""
    if x.shape[axis] >= size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return np.pad(x, widths)


def _greedy(n: int) -> SamplingBatch:
    return SamplingBatch(
        np.zeros(n, np.float32),
        np.zeros(n, np.int32),
        np.ones(n, np.float32),
        np.zeros(n, np.uint32),
    )


def _concat_sampling(batches: list[SamplingBatch]) -> SamplingBatch:
    return SamplingBatch(*(np.concatenate(cols) for cols in zip(*(b.as_tuple() for b in batches))))
