"""One module's compute: its runtime (`ModuleRuntime`, the jitted entry points) and a pool of
KV-cache slots; no model math of its own.

Sessions are stepped through a chain of these (`serving.chain.ChainEngine`, one module or
several, their steps one compiled program): in-process (`LocalExecutor`: `take`/`give` hand
slots out and the pool grows on demand) and in a module server (a fixed pool; its `SessionTable`
hands slots out, and `Batcher` concatenates sessions into one decode step). Here: the pool, the
input checks, a step of this module alone (`step`, for unfused in-process runs) and the
stateless forward.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from pathways import checkpoint as ckpt
from pathways import modules as mod
from pathways import sharding
from pathways.executor.base import bucket, padded_length
from pathways.runtime import ModuleRuntime, streams_weights
from pathways.serving.errors import InvalidArgument
from pathways.serving.limits import ProgramCap


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
        total += n * max(window, positions) * self.kind.score_heads(cfg) * 4 * 2
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

    # ---- the stateless forward -------------------------------------------------------------
    def forward(self, x, causal: bool = True):
        """A stateless forward with the call's attention mask. The batch is padded to a power
        of two and so is the length where padding cannot change the real positions (a causal
        call over positions that stay positions), cut off after: the shapes clients send
        compile a bounded number of programs. A bidirectional call would attend to padding
        and a pooling head would average it, so their lengths are kept."""
        b, t = x.shape[:2]
        bp = bucket(b, limit=1 << 30, minimum=1)
        x = pad_axis(x, 0, bp)
        per_position = self.cfg.input_contract[0] in ("tokens", "hidden") and (
            self.cfg.output_contract[0] in ("hidden", "logits")
        )
        if causal and per_position:
            tp = padded_length(t, self.max_seq_len or 1 << 30)
            x = pad_axis(x, 1, tp)
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


def pad_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """x zero-padded along `axis` to `size` (x itself when it is that long)."""
    if x.shape[axis] >= size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return np.pad(x, widths)
