"""Local executor: every module of every pathway in this process, each its own jitted program."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pathways import modules as mod
from pathways.executor.base import Session, StepResult, bucket, pad_prompts
from pathways.runtime import ModuleRuntime, _fused_step, composite_loss
from pathways.sampling import SamplingParams
from pathways.spec import PathwaySpec


class LocalExecutor:
    """Runs any pathway of a spec in-process. Modules are shared between pathways by name.

    `weights` is the dtype sessions decode with and `native` whether with the native matmul
    (see `ModuleRuntime`); training, `forward` and `loss` use the float32 parameters and XLA.
    With `fuse` (the default) a session's step through a pathway runs as one compiled program
    (`_fused_step`); `fuse=False` runs one program per module, as module servers do.
    """

    def __init__(
        self,
        spec: PathwaySpec,
        states: dict[str, Any] | None = None,
        seed: int = 0,
        weights: str = "float32",
        native: bool | None = None,
        fuse: bool = True,
    ):
        self.spec, self.fuse = spec, fuse
        self.runtimes: dict[str, ModuleRuntime] = {}
        for i, (name, cfg) in enumerate(spec.modules.items()):
            self.runtimes[name] = ModuleRuntime(
                name, cfg, mod.build(cfg, seed=seed + i), weights=weights, native=native
            )
            if states and name in states:
                self.set_state(name, states[name])
        self._caches: dict[str, dict[str, dict[str, jax.Array]]] = {}  # session -> module -> KV
        # session -> (slots, temperature, top_k, top_p, seed) on the device, and whether any row
        # samples: fixed for a session, so its fused steps do not copy them in every time
        self._fixed: dict[str, tuple] = {}
        self._spare: dict[tuple[str, int], list] = {}  # (module, rows) -> caches of closed sessions
        self.max_spare_caches = 2
        self._grad_fns: dict[str, Any] = {}

    # ---- parameters -------------------------------------------------------------------------
    def state(self, name: str):
        return self.runtimes[name].state

    def set_state(self, name: str, state) -> None:
        rt = self.runtimes[name]
        if jax.tree.structure(state) != jax.tree.structure(rt.state):
            raise ValueError(f"module {name!r}: parameters do not match its config")
        rt.state = state

    def chain(self, pathway: str) -> list[ModuleRuntime]:
        return [self.runtimes[m] for m in self.spec.pathway(pathway).modules]

    # ---- sessions ---------------------------------------------------------------------------
    def open_session(self, pathway: str, sampling: list[SamplingParams]) -> Session:
        session = Session.new(pathway, sampling, self.spec.pathway(pathway).max_seq_len)
        b = session.batch_size
        self._caches[session.id] = {
            rt.name: self._spare_cache(rt, b) for rt in self.chain(pathway) if rt.kind.has_cache
        }
        sb = session.sampling
        fixed = (np.arange(b, dtype=np.int32), sb.temperature, sb.top_k, sb.top_p, sb.seed)
        self._fixed[session.id] = (jax.device_put(fixed), bool((sb.temperature > 0).any()))
        return session

    def _spare_cache(self, rt: ModuleRuntime, rows: int):
        """A closed session's cache of the same shape, else a new one.

        Stale keys/values need no zeroing: a position is only attended to after this session has
        written it (the causal mask is by position), so reuse saves allocating and zeroing
        (L, B, T_max, K, H) per request — 75 MB and 10-15 ms for GPT-2 small.
        """
        spare = self._spare.get((rt.name, rows), [])
        while spare:
            cache = spare.pop()
            if not any(a.is_deleted() for a in cache.values()):  # donated to a failed call
                return cache
        return rt.kind.empty_cache(rt.cfg, rows)

    def close_session(self, session: Session) -> None:
        caches = self._caches.pop(session.id, None) or {}
        self._fixed.pop(session.id, None)
        for name, cache in caches.items():
            spare = self._spare.setdefault((name, session.batch_size), [])
            if len(spare) < self.max_spare_caches:
                spare.append(cache)

    def prefill(self, session: Session, prompts: list[list[int]], *, return_logits=False):
        lengths = session.check_prompts(prompts)
        tokens, positions, last = pad_prompts(prompts, session.lengths, session.max_seq_len)
        result = self._run(session, tokens, positions, last, return_logits)
        session.lengths += lengths
        return result

    def decode(self, session: Session, tokens, *, return_logits=False):
        tokens = np.asarray(tokens, np.int32).reshape(session.batch_size, 1)
        session.check_room(np.ones(session.batch_size, np.int32))
        positions = session.lengths[:, None].astype(np.int32)
        result = self._run(
            session, tokens, positions, np.zeros(session.batch_size, np.int32), return_logits
        )
        session.lengths += 1
        return result

    def _run(self, session, tokens, positions, last, return_logits) -> StepResult:
        caches = self._caches.get(session.id)
        if caches is None:
            raise KeyError(f"unknown session {session.id!r}")
        window = bucket(
            int(positions[positions < session.max_seq_len].max()) + 1, session.max_seq_len
        )
        # numpy arguments go straight into the jitted calls (jnp.asarray or jnp.arange would each
        # dispatch an eager computation first).
        x = np.array(tokens, np.int32)  # a copy: the caller may reuse its array
        pos = np.asarray(positions, np.int32)
        chain = self.chain(session.pathway)
        last = np.asarray(last, np.int32)
        # A copy of steps: on CPU, jax may alias a numpy argument without copying it, and the
        # call runs asynchronously, so the in-place += below could race with its read.
        steps = session.steps.copy()
        if self.fuse:
            (slots, *settings), draw = self._fixed[session.id]
            cached = [rt.name for rt in chain if rt.kind.has_cache]
            leaves = [rt._serving_flat()[0] for rt in chain]
            out, logits, new = _fused_step(chain)(
                leaves,
                [caches[n] for n in cached],
                x,
                pos,
                slots,
                last,
                *settings,
                steps,
                window=window,
                draw=draw,
                with_logits=return_logits,
            )
            caches.update(zip(cached, new))
        else:
            slots = np.arange(session.batch_size, dtype=np.int32)
            for rt in chain[:-1]:
                x, cache = rt.step(x, pos, caches.get(rt.name), slots, window=window)
                if cache is not None:
                    caches[rt.name] = cache
            s = session.sampling
            out, logits = chain[-1].serve_head(
                x, last, s.temperature, s.top_k, s.top_p, s.seed, steps
            )
        session.steps += 1
        return StepResult(
            tokens=np.asarray(out), logits=np.asarray(logits) if return_logits else None
        )

    # ---- stateless ---------------------------------------------------------------------------
    def forward(self, pathway: str, tokens) -> np.ndarray:
        tokens = jnp.asarray(tokens, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = tokens
        for rt in self.chain(pathway):
            x = rt.forward(rt.state, x, positions)
        return np.asarray(x)

    def loss(self, pathway: str, inputs, targets) -> float:
        return float(self.loss_and_grads(pathway, inputs, targets, grads=False)[0])

    def loss_and_grads(self, pathway: str, inputs, targets, *, grads: bool = True):
        """Returns (loss, {module name: gradient of its parameters}) for one batch."""
        chain = self.chain(pathway)
        key = f"{pathway}:{grads}"
        if key not in self._grad_fns:
            f = functools.partial(composite_loss, chain)
            self._grad_fns[key] = jax.jit(jax.value_and_grad(f) if grads else f)
        states = [rt.state for rt in chain]
        out = self._grad_fns[key](states, jnp.asarray(inputs), jnp.asarray(targets))
        if not grads:
            return out, None
        loss, g = out
        return loss, {rt.name: gi for rt, gi in zip(chain, g)}
