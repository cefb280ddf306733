"""Local executor: every module of every pathway in this process, a chain of module engines."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pathways import checkpoint as ckpt
from pathways import modules as mod
from pathways.executor.base import Session, StepResult, bucket, forward_input, pad_prompts
from pathways.runtime import ModuleRuntime, composite_loss
from pathways.sampling import SamplingParams
from pathways.serving.chain import ChainEngine
from pathways.serving.engine import ModuleEngine
from pathways.spec import PathwaySpec


class LocalExecutor:
    """Runs any pathway of a spec in-process. Modules are shared between pathways by name.

    Each module is a `ModuleEngine`, the same one a module server hosts: its runtime and a
    KV-cache slot pool that grows with the sessions open. `weights` is the dtype sessions decode
    with and `native` whether with the native matmul (see `ModuleRuntime`); training, `forward`
    and `loss` use the float32 parameters and XLA. With `fuse` (the default) a session's step
    through a pathway runs as one compiled program (`ChainEngine`, `runtime.fused_step`, what a
    module server runs for the module(s) it hosts); `fuse=False` runs one program per module.
    With a `mesh` (`pathways.sharding`) every module
    is split over its devices (tensor parallel).

    A module's parameters come from `states` (name -> nnx.State), else from the checkpoint
    directory `checkpoint` where it holds the module (restored straight into the module's
    abstract shapes, `checkpoint.restore_module`), else are initialised from `seed`: a module
    given weights is built around them, never initialised first (no random copy beside them).
    """

    def __init__(
        self,
        spec: PathwaySpec,
        states: dict[str, Any] | None = None,
        seed: int = 0,
        weights: str = "float32",
        native: bool | None = None,
        fuse: bool = True,
        mesh=None,
        checkpoint: str | Path | None = None,
    ):
        self.spec, self.fuse = spec, fuse
        self.engines: dict[str, ModuleEngine] = {}
        for i, (name, cfg) in enumerate(spec.modules.items()):
            state = None
            if states and name in states:
                state = states[name]
                _check_structure(name, cfg, state)
            elif checkpoint is not None and ckpt.has_module(checkpoint, name):
                state = ckpt.restore_module(checkpoint, name, cfg)
            self.engines[name] = ModuleEngine(
                name, cfg, state, weights=weights, native=native, seed=seed + i, mesh=mesh
            )
            del state  # the engine's runtime holds the weights (on a mesh: its placed copy)
        # Where a session's fixed step arguments live: every device of the mesh, or the default.
        self._fixed_on = None if mesh is None else NamedSharding(mesh, PartitionSpec())
        # session -> {module: its slots}; and its fixed step arguments on the device (slots per
        # cached module, temperature, top_k, top_p, seed) with whether any row samples: fixed
        # for a session, so its fused steps do not copy them in every time
        self._slots: dict[str, dict[str, np.ndarray]] = {}
        self._fixed: dict[str, tuple] = {}
        self._grad_fns: dict[str, Any] = {}
        self._zeros: dict[int, np.ndarray] = {}  # batch size -> a decode step's `last`
        # pathway -> its engines as one chain (`ChainEngine`: the fused program and the
        # parameter leaves it passes, looked up once per parameter change rather than per
        # token: ~25 us of Python per step otherwise, 5 % of a tiny model's).
        self._chains: dict[str, ChainEngine] = {}
        # Sessions share each engine's cache pool (donated to every step): one step at a time.
        self._lock = threading.Lock()

    @property
    def runtimes(self) -> dict[str, ModuleRuntime]:
        return {name: e.rt for name, e in self.engines.items()}

    # ---- parameters -------------------------------------------------------------------------
    def state(self, name: str):
        return self.engines[name].rt.state

    def set_state(self, name: str, state) -> None:
        rt = self.engines[name].rt
        if jax.tree.structure(state) != jax.tree.structure(rt.state):
            raise ValueError(f"module {name!r}: parameters do not match its config")
        rt.state = state

    def chain(self, pathway: str) -> list[ModuleRuntime]:
        return [e.rt for e in self._engines(pathway)]

    def _engines(self, pathway: str) -> list[ModuleEngine]:
        return [self.engines[m] for m in self.spec.pathway(pathway).modules]

    # ---- sessions ---------------------------------------------------------------------------
    def open_session(self, pathway: str, sampling: list[SamplingParams]) -> Session:
        session = Session.new(pathway, sampling, self.spec.pathway(pathway).max_seq_len)
        b = session.batch_size
        with self._lock:
            slots = {e.name: e.take(b) for e in self._engines(pathway) if e.kind.has_cache}
        self._slots[session.id] = slots
        sb = session.sampling
        fixed = (list(slots.values()), sb.temperature, sb.top_k, sb.top_p, sb.seed)
        fixed = jax.device_put(fixed, self._fixed_on)
        self._fixed[session.id] = (fixed, bool((sb.temperature > 0).any()))
        return session

    def close_session(self, session: Session) -> None:
        slots = self._slots.pop(session.id, None) or {}
        self._fixed.pop(session.id, None)
        with self._lock:
            for name, rows in slots.items():
                self.engines[name].give(rows)

    def prefill(self, session: Session, prompts: list[list[int]], *, return_logits=False):
        lengths = session.check_prompts(prompts)
        # Arrays of its own (pad_prompts makes them): passed to the step without copying.
        tokens, positions, last = pad_prompts(prompts, session.lengths, session.max_seq_len)
        result = self._run(session, tokens, positions, last, return_logits)
        session.lengths += lengths
        return result

    def decode(self, session: Session, tokens, *, return_logits=False):
        b = session.batch_size
        # A copy: the caller may reuse its array, and on CPU jax may alias a numpy argument
        # while the call runs asynchronously. (The per-token path: a tiny model's step is
        # ~0.3 ms, so a few us of Python here show.)
        x = np.array(tokens, np.int32).reshape(b, 1)
        top = int(session.lengths.max())  # every row's next position is below max_seq_len
        if top >= session.max_seq_len:
            session.check_room(np.ones(b, np.int32))  # raises, naming the limit
        positions = session.lengths[:, None].astype(np.int32)  # a copy (+= below)
        last = self._zeros.get(b)
        if last is None:  # never written: safe to pass (and alias) on every step
            last = self._zeros[b] = np.zeros(b, np.int32)
        result = self._run(
            session, x, positions, last, return_logits, bucket(top + 1, session.max_seq_len)
        )
        session.lengths += 1
        return result

    def _run(self, session, x, positions, last, return_logits, window=None) -> StepResult:
        """One step of the session's rows: x (B, T) and positions (B, T) int32 arrays of the
        caller's own (passed without copying), last (B,) the head's positions in them."""
        slots = self._slots.get(session.id)
        if slots is None:
            raise KeyError(f"unknown session {session.id!r}")
        if window is None:  # the attended positions: padding (at max_seq_len) left out
            window = bucket(
                int(positions[positions < session.max_seq_len].max()) + 1, session.max_seq_len
            )
        with self._lock:
            if self.fuse:
                (rows, *settings), draw = self._fixed[session.id]
                # The step counts seed only a draw: a greedy session's program takes none. A
                # copy: on CPU jax may alias a numpy argument, and the call runs asynchronously,
                # so the in-place += below could race with its read.
                steps = session.steps.copy() if draw else None
                out, logits = self._chain(session.pathway).run(
                    x,
                    positions,
                    rows,
                    last,
                    settings,
                    steps,
                    window=window,
                    draw=draw,
                    with_logits=return_logits,
                )
            else:
                engines = self._engines(session.pathway)
                for e in engines[:-1]:
                    x = e.step(x, positions, slots.get(e.name), window=window)
                s = session.sampling
                out, logits = engines[-1].rt.serve_head(
                    x, last, s.temperature, s.top_k, s.top_p, s.seed, session.steps.copy()
                )
        session.steps += 1
        return StepResult(
            tokens=np.asarray(out), logits=np.asarray(logits) if return_logits else None
        )

    def _chain(self, pathway: str) -> ChainEngine:
        """The pathway's engines as one chain (its fused step program and parameter leaves,
        looked up once per parameter change)."""
        chain = self._chains.get(pathway)
        if chain is None:
            chain = self._chains[pathway] = ChainEngine(self._engines(pathway))
        return chain

    # ---- stateless ---------------------------------------------------------------------------
    def forward(self, pathway: str, inputs, *, head: bool = True) -> np.ndarray:
        causal = self.spec.pathway(pathway).causal
        chain = self.chain(pathway)
        x = jnp.asarray(forward_input(inputs))
        for rt in chain if head else chain[:-1]:
            # Positions per module: an image embedding turns (B, H, W, C) into (B, patches, D).
            x = rt.forward(rt.state, x, mod.positions(x), causal=causal)
        return np.asarray(x)

    def loss(self, pathway: str, inputs, targets) -> float:
        return float(self.loss_and_grads(pathway, inputs, targets, grads=False)[0])

    def loss_and_grads(self, pathway: str, inputs, targets, *, grads: bool = True):
        """Returns (loss, {module name: gradient of its parameters}) for one batch."""
        chain = self.chain(pathway)
        key = f"{pathway}:{grads}"
        if key not in self._grad_fns:
            causal = self.spec.pathway(pathway).causal
            f = functools.partial(composite_loss, chain, causal=causal)
            self._grad_fns[key] = jax.jit(jax.value_and_grad(f) if grads else f)
        states = [rt.state for rt in chain]
        out = self._grad_fns[key](states, jnp.asarray(inputs), jnp.asarray(targets))
        if not grads:
            return out, None
        loss, g = out
        return loss, {rt.name: gi for rt, gi in zip(chain, g)}


def _check_structure(name: str, cfg, state) -> None:
    """Raises ValueError unless `state` has the tree of `cfg`'s module (from its abstract
    shapes: nothing is built)."""
    if jax.tree.structure(state) != jax.tree.structure(nnx.state(mod.abstract(cfg))):
        raise ValueError(f"module {name!r}: parameters do not match its config")
