"""One module's runtime: its parameters and its jitted, functional entry points (serving,
fused chains of modules, the whole pathway's loss)."""

from __future__ import annotations

import gc
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pathways import backends, cpu, kernels, sharding
from pathways import modules as mod
from pathways import weights as weights_lib
from pathways.modules import registry
from pathways.sampling import sample

# On CPU, PATHWAYS_CPU_DISPATCH=sync runs a step on the thread that calls it (default: JAX's
# async dispatch); the process's first computation creates JAX's CPU client with it.
cpu.configure_dispatch()


def streams_weights(weights: str, mesh) -> bool:
    """Whether a module's weights are read from a checkpoint a few arrays at a time and
    converted as read (`ModuleRuntime.load_serving`): bfloat16/int8 storage off a mesh, where the
    serving copy is smaller than the float32 parameters; otherwise they are read whole."""
    return weights != "float32" and mesh is None


class ModuleRuntime:
    """One module's parameters and its jitted, functional entry points (no nnx.jit graph mode).

    `state` holds the parameters as trained and saved; `serving_state` is what sessions (prefill
    and decode) compute with: the same parameters stored as `weights` says ("float32";
    "bfloat16" or "int8" for a half or a quarter of the bytes, see `pathways.weights`), with
    linear kernels packed for the native matmul where that backend is used.
    It is rebuilt on first use after `state` changes. `native=False` keeps XLA's dot (for
    comparisons; None uses the native kernel wherever it builds, see `pathways.kernels`).

    Sessions call `step` (the kind's one step, see `modules.kind`) and, on a head, `serve_head`
    (the step on each row's last position, then sampling): they pass the serving parameters
    as a flat list of arrays, because flattening an `nnx.State` (a Python callback per
    Variable) took ~0.25 ms of every call's dispatch for a 6-layer module — time a module
    server spends on every decode hop before its step starts.
    """

    def __init__(
        self,
        name: str,
        cfg: mod.ModuleConfig,
        module: nnx.Module,
        weights: str = "float32",
        native: bool | None = None,
        mesh=None,
    ):
        weights_lib.check(weights)
        if weights == "int8" and mesh is not None:
            raise ValueError(
                f"module {name!r}: int8 weights are not supported on a tensor-parallel mesh "
                f"(use float32 or bfloat16)"
            )
        self.name, self.cfg, self.weights, self.native = name, cfg, weights, native
        self.kind = registry.of(cfg)  # resolved once: callers ask it, never compare names
        # A tensor-parallel mesh (`pathways.sharding`): parameters and cache are placed by the
        # kind's partition rules, and the same jitted functions run SPMD over its devices.
        self.mesh, self.placement = mesh, None
        self.graphdef, self.state = nnx.split(module)
        # Modules of equal configs (and every executor in the process) share one set of jitted
        # entry points, so one compiled program per shape. `forward` takes a state (training,
        # stateless calls); sessions go through `step` and `serve_head`.
        self.forward = _entry_points(self.graphdef).forward

    @property
    def state(self):
        if self._state is None:  # dropped by compact(): rebuild from the serving copy
            # Native-packed kernels back to (K, N) (exact for float32), then what bfloat16 /
            # int8 storage holds, as float32 (see compact).
            state = kernels.unpack_state(self.serving_state, self._template)
            if self.weights != "float32":
                state = weights_lib.restore(state, self._template)
            self._state = state
        return self._state

    @state.setter
    def state(self, state) -> None:
        if self.mesh is not None:
            self.placement = sharding.plan(
                self.kind.partition, self.cfg, state, self.mesh, what=f"{self.name}/"
            )
            state = sharding.place(state, self.placement)
        self._state, self._servings, self._flats = state, {}, {}
        self.version = getattr(self, "version", -1) + 1  # callers caching serving leaves compare

    def compact(self) -> bool:
        """Keeps one copy of the weights, for a process that only serves: drops the float32
        parameters when a serving copy differs from them — packed float32 kernels (exact), or
        bfloat16/int8 storage (then `state` becomes what the serving copy holds, no longer the
        checkpoint's float32 values: a module server started to train keeps float32 weights).
        `state` rebuilds them on first use (training, checkpoints).

        Serving copies not built yet are built array by array, each float32 array dropped as
        soon as its serving form exists, so the process never holds both copies whole: called
        before the first step (a module server's start), the peak is about one copy of the
        weights. Arrays that callers still hold are not freed, but nothing else changes."""
        if self._state is None:
            return False  # compacted already, not rebuilt since
        if self.mesh is not None:
            # Where prefill chunks compute with another copy (kernels chosen for decode only),
            # built now, as the decode copy is: from the float32 parameters.
            self.serving_for(prefill=False)
            self.serving_for(prefill=True)
            return False
        natives = {self._native_for(False), self._native_for(True)}
        if self.weights == "float32" and not (self.native_ops and any(natives)):
            self.serving_for(prefill=False)  # the parameters themselves
            self.serving_for(prefill=True)
            return False
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._state)
        self._build_servings([n for n in natives if n not in self._servings])
        if self.weights == "float32" and False in natives:
            # The kernels chosen for one shape class only: XLA's copy, for the other, is the
            # float32 parameters themselves. Nothing to drop; that copy stays the state.
            self._state = self._servings[False]
            return False
        serving = self.serving_state
        if self.weights == "float32" and not any(
            getattr(a, "ndim", 0) != len(t.shape)
            for a, t in zip(jax.tree.leaves(serving), jax.tree.leaves(template))
        ):  # no kernel packed (a kind without linear layers): the copy is the parameters
            self._state = serving
            return False
        self._template, self._state = template, None
        return True

    def _build_servings(self, natives: list[bool]) -> None:
        """The serving copies for `natives` (see `_serving_copy`), made from `_state` one array
        at a time; `_state` is consumed: each float32 array is released once converted."""
        if not natives:
            return
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(self._state)
        self._state = None  # the leaves below are the last references this runtime holds
        paths = [path for path, _ in paths_leaves]
        leaves = [x for _, x in paths_leaves]
        del paths_leaves
        gc.collect()  # a module built around the arrays may hold them in a reference cycle

        def take():
            for i, path in enumerate(paths):
                x, leaves[i] = leaves[i], None
                yield path, x

        self._servings.update(self._convert(take(), treedef, natives))

    def _convert(self, source, treedef, natives) -> dict:
        """{native: serving copy} from the float32 (path, array) pairs `source` yields in leaf
        order, each array converted for every copy and released before the next is taken."""
        copies: dict[bool, list] = {native: [] for native in natives}
        for path, x in source:
            x = jnp.asarray(x)  # a checkpoint's numpy array: on the device, as a step takes it
            for i, native in enumerate(natives):
                if i and not self._packs:  # the copies are alike: one array serves both
                    copies[native].append(copies[natives[0]][-1])
                    continue
                # Done before the next array starts (eager ops are dispatched asynchronously:
                # the float32 input would otherwise stay alive until its conversion ran).
                copies[native].append(jax.block_until_ready(self._serving_leaf(path, x, native)))
            del x
        if any(len(c) != treedef.num_leaves for c in copies.values()):
            raise ValueError(
                f"module {self.name!r}: {len(next(iter(copies.values())))} parameters given, "
                f"{treedef.num_leaves} expected"
            )
        return {native: jax.tree.unflatten(treedef, c) for native, c in copies.items()}

    def load_serving(self, source) -> None:
        """Serves the float32 parameters `source` yields as (key path, array) in this module's
        leaf order, stored as `weights` says, without ever holding them whole: each array is
        converted and released before the next is read (`checkpoint.stream_module` reads a
        checkpoint a few arrays at a time). For a process that only serves bfloat16/int8
        weights: its peak is about the stored copy plus one read, not one float32 copy (a
        module server's start; Publish of a checkpoint). `state` is rebuilt from the serving
        copy on first use, as after `compact`. The copies in use stay until every array has
        been converted, so a failing source changes nothing."""
        if self.mesh is not None:
            raise ValueError(f"module {self.name!r}: streamed weights are not placed on a mesh")
        template = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
            self._template if self._state is None else self._state,
        )
        natives = sorted({self._native_for(False), self._native_for(True)})
        servings = self._convert(source, jax.tree.structure(template), natives)
        self._template, self._state, self._servings, self._flats = template, None, servings, {}
        self.version = getattr(self, "version", -1) + 1

    @property
    def serving_state(self):
        """The parameters decode steps compute with (see the class docstring)."""
        return self.serving_for(prefill=False)

    def _serving_copy(self, native: bool):
        """The serving parameters with linear kernels packed for the native matmul (`native`)
        or as XLA's dot takes them. A float32 module keeps both only where the kernels were
        chosen for one shape class and not the other (`kernels.chosen`: e.g. decode steps but
        not prefill chunks on some CPUs), so each step computes with the faster one; a bfloat16
        module keeps one (`_native_for`)."""
        if native not in self._servings and not self._packs and (not native) in self._servings:
            self._servings[native] = self._servings[not native]  # alike: one copy serves both
        if native not in self._servings:
            serving = jax.tree_util.tree_map_with_path(
                lambda path, x: self._serving_leaf(path, x, native), self._state
            )
            if self.mesh is not None:  # bfloat16-rounded copies go where the parameters are
                serving = sharding.place(serving, self.placement)
            self._servings[native] = serving
        return self._servings[native]

    @property
    def _packs(self) -> bool:
        """Whether the native kernels' serving copy differs from XLA's (packed kernels: float32
        and bfloat16 storage); for int8 both copies are the same arrays."""
        return self.weights in kernels.WEIGHTS

    def _serving_leaf(self, path, x, native: bool):
        """One float32 parameter (`path`: its key path) as the serving copy for `native` holds
        it: linear kernels packed for the native matmul where it is used and `weights` is one it
        takes (packed kernels are 3-D: `store_leaf` leaves them), then stored as `weights` says
        (the token table as on the XLA path)."""
        if native and self._packs:
            x = kernels.pack_leaf(path, x, self.weights, True)
        return weights_lib.store_leaf(path, x, self.weights)

    def _serving_flat(self, prefill: bool = False):
        """(leaves of the serving parameters a step of this kind computes with, the jitted
        entry points that take them): prefill chunks (more than one position) and decode steps
        may use different copies (see `_serving_copy`)."""
        native = self._native_for(prefill)
        if native not in self._flats:
            leaves, treedef = jax.tree.flatten(self._serving_copy(native))
            # Packing concatenates vectors that a mesh splits differently: not on a mesh.
            leaves, layout = _pack_small(leaves) if self.mesh is None else (leaves, None)
            self._flats[native] = leaves, _flat_entry_points(self.graphdef, treedef, layout)
        return self._flats[native]

    def serving_for(self, prefill: bool):
        """The serving parameters a prefill chunk (`prefill`) or a decode step computes with."""
        return self._serving_copy(self._native_for(prefill))

    def _native_for(self, prefill: bool) -> bool:
        if not self.native_ops:
            return False
        decode = kernels.chosen("decode")
        if self.weights == "bfloat16":
            # bfloat16 is asked for to halve the weights' bytes; a packed copy beside an XLA one
            # (kernels chosen for one shape class only) would hold as many as float32. One copy:
            # prefill chunks compute with the decode steps' choice.
            return decode
        return kernels.chosen("prefill") if prefill else decode

    def step(self, x, positions, cache=None, slots=None, *, window: int | None = None, causal=True):
        """The module's step with the serving parameters: (output, cache). With a cache (kinds
        that keep one: prefill or decode of the sessions in `slots`, attending to the first
        `window` positions) the cache is updated in place (donated); without one it is the
        stateless forward (with the call's mask, `causal`) and the cache returned is None."""
        leaves, jits = self._serving_flat(prefill=x.shape[1] > 1)
        if cache is None:
            return jits.forward(leaves, x, positions, causal=causal), None
        return jits.step(
            leaves, x, positions, cache, slots, window=window, native=self.native_attention
        )

    def serve_head(self, h_btd, last_b, temperature, top_k, top_p, seed, step):
        """The decoding module on each row's position `last_b` of h_btd, then sampling:
        (sampled tokens, logits)."""
        leaves, jits = self._serving_flat()
        return jits.head_sample(leaves, h_btd, last_b, temperature, top_k, top_p, seed, step)

    @property
    def native_ops(self) -> bool:
        """Whether sessions use the native kernels (built on first use; never on a mesh: they
        have no sharding rule)."""
        if self.mesh is not None:
            return False
        return kernels.available() if self.native is None else (self.native and kernels.available())

    @property
    def native_attention(self) -> bool:
        """Whether a decode step's cache write and attention run as the native op (where the
        kernels were chosen for decode shapes: `kernels.chosen`)."""
        return self._native_for(prefill=False)

    def module(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state)

    def param_count(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.state))


def _forward(graphdef, state, x, positions, causal=True):
    return nnx.merge(graphdef, state).step(x, positions, causal=causal)[0]


def _step(graphdef, state, x, positions, cache, slots, *, window, native):
    # `native` is static in every program that calls this: traced once each way.
    with backends.using(native):
        return nnx.merge(graphdef, state).step(x, positions, cache, slots, window)


def _head_sample(graphdef, state, h_btd, last_b, temperature, top_k, top_p, seed, step, draw=None):
    h_bd = jnp.take_along_axis(h_btd, last_b[:, None, None], axis=1)[:, 0]
    logits, _ = nnx.merge(graphdef, state).step(h_bd, None)
    return sample(logits, temperature, top_k, top_p, seed, step, draw), logits


def _jitted(graphdef, to_state) -> SimpleNamespace:
    """The jitted entry points of a module; their first argument becomes its state through
    `to_state`. `raw` holds the same functions unjitted, for programs that fuse several modules
    (`fused_step`)."""

    def forward(params, x, positions, causal=True):
        return _forward(graphdef, to_state(params), x, positions, causal)

    def step(params, x, positions, cache, slots, *, window, native):
        return _step(
            graphdef, to_state(params), x, positions, cache, slots, window=window, native=native
        )

    def head_sample(params, h_btd, last_b, temperature, top_k, top_p, seed, step, draw=None):
        return _head_sample(
            graphdef, to_state(params), h_btd, last_b, temperature, top_k, top_p, seed, step, draw
        )

    return SimpleNamespace(
        forward=jax.jit(forward, static_argnames="causal"),
        step=jax.jit(step, static_argnames=("window", "native"), donate_argnames="cache"),
        head_sample=jax.jit(head_sample),
        raw=SimpleNamespace(forward=forward, step=step, head_sample=head_sample),
    )


_FUSED: dict[tuple, Any] = {}


def fused_step(chain: list[ModuleRuntime], prefill: bool = False):
    """One jitted program for a chain's session step (prefill or decode): every module's step,
    then, when the chain ends in a head, the head's sampling (a chain without one, e.g. the
    attention modules a server hosts together, returns its last hidden states: `out`, and no
    logits; its sampling arguments are ignored). The modules stay separate (each its own
    parameters, passed as its own flat leaves, and its own KV-cache pool with the session's
    slots in it: `caches` and `slots` have one entry per module that keeps a cache); only their
    programs are compiled as one, so XLA schedules across module boundaries and the step costs
    one dispatch instead of one per module.

    Programs are shared by chains of the same modules' entry points (identity of the cached
    entry-point sets: no hashing of graphdefs per call). `prefill`: the program of a prefill
    chunk, whose modules may compute with other copies of their parameters (`_serving_flat`).
    """
    jits = tuple(rt._serving_flat(prefill)[1] for rt in chain)
    natives = tuple(rt.native_attention for rt in chain)
    cached = tuple(rt.kind.has_cache for rt in chain)
    head = chain[-1].kind.is_head
    key = (tuple(map(id, jits)), natives)  # the sets live as long as the process (cached)
    if key not in _FUSED:
        raws = [j.raw for j in jits]

        def step(
            leaves,
            caches,
            x,
            positions,
            slots,
            last,
            temperature,
            top_k,
            top_p,
            seed,
            steps,
            *,
            window,
            draw,
            with_logits,
        ):
            out_caches, it, rows = [], iter(caches), iter(slots)
            body = len(chain) - 1 if head else len(chain)
            for has_cache, raw, params, native in zip(
                cached[:body], raws[:body], leaves[:body], natives
            ):
                if has_cache:
                    x, cache = raw.step(
                        params, x, positions, next(it), next(rows), window=window, native=native
                    )
                    out_caches.append(cache)
                else:
                    x = raw.forward(params, x, positions)
            if not head:
                return x, None, out_caches
            out, logits = raws[-1].head_sample(
                leaves[-1], x, last, temperature, top_k, top_p, seed, steps, draw
            )
            # Logits only when asked for: (B, vocab) floats written out every step otherwise.
            return out, (logits if with_logits else None), out_caches

        _FUSED[key] = jax.jit(
            step, static_argnames=("window", "draw", "with_logits"), donate_argnames="caches"
        )
    return _FUSED[key]


_ENTRY_POINTS: dict[Any, SimpleNamespace] = {}


def _entry_points(graphdef) -> SimpleNamespace:
    """Jitted entry points taking the state, one set per distinct graphdef.

    The graphdef is hashed once here. As a static jit argument it would be hashed and compared
    on every call: about 0.9 ms per call for a 6-layer attention module, 2-4 ms per decoded token
    of GPT-2 small.
    """
    if graphdef not in _ENTRY_POINTS:
        _ENTRY_POINTS[graphdef] = _jitted(graphdef, lambda state: state)
    return _ENTRY_POINTS[graphdef]


_FLAT_ENTRY_POINTS: dict[Any, SimpleNamespace] = {}


def _flat_entry_points(graphdef, treedef, layout=None) -> SimpleNamespace:
    """Jitted entry points taking the state as a flat list of the leaves of `treedef`, with the
    small ones packed into one array as `_pack_small` describes in `layout` (None: unpacked)."""
    key = (graphdef, treedef, layout)
    if key not in _FLAT_ENTRY_POINTS:
        _FLAT_ENTRY_POINTS[key] = _jitted(
            graphdef, lambda params: jax.tree.unflatten(treedef, _unpack_small(params, layout))
        )
    return _FLAT_ENTRY_POINTS[key]


def _pack_small(leaves: list) -> tuple[list, tuple | None]:
    """Concatenates the float32 vectors among `leaves` (biases, norm scales) into one array,
    appended after the others: (new leaves, layout for `_unpack_small`; None if nothing packs).

    Dispatch costs per argument (~2 µs on a module server that just woke up): a 6-layer
    attention module passes 37 arrays instead of 96. Slicing them apart inside the jitted
    program is free (static slices fused into their consumers) and exact.
    """
    small = tuple(
        i for i, a in enumerate(leaves) if getattr(a, "ndim", 0) == 1 and a.dtype == jnp.float32
    )
    if len(small) < 2:
        return leaves, None
    packed = jnp.concatenate([leaves[i] for i in small])
    chosen = set(small)
    rest = [a for i, a in enumerate(leaves) if i not in chosen]
    return [*rest, packed], (len(leaves), small, tuple(leaves[i].shape[0] for i in small))


def _unpack_small(params: list, layout: tuple | None) -> list:
    """The leaves `_pack_small` was given, from its output (inside the jitted program)."""
    if layout is None:
        return params
    n, small, sizes = layout
    *rest, packed = params
    out, it, at = [None] * n, iter(rest), 0
    for i, size in zip(small, sizes):
        out[i] = packed[at : at + size]
        at += size
    return [next(it) if a is None else a for a in out]


def composite_forward(runtimes: list[ModuleRuntime], states: list[Any], inputs, *, causal=True):
    """Each module's stateless step in turn (a head's: its outputs), with the pathway's
    attention mask (`causal`; False for images and utterances). Positions are counted per
    module: an image embedding turns (B, H, W, C) into (B, patches, D)."""
    x = inputs
    for rt, st in zip(runtimes, states):
        x = mod.forward(nnx.merge(rt.graphdef, st), x, causal=causal)
    return x


def composite_loss(
    runtimes: list[ModuleRuntime], states: list[Any], inputs, targets, mask=None, *, causal=True
):
    """Loss of a whole pathway as one function of every module's state (for jax.grad); the
    targets are what the head's `loss` reads (next tokens, labels)."""
    h = composite_forward(runtimes[:-1], states[:-1], inputs, causal=causal)
    return nnx.merge(runtimes[-1].graphdef, states[-1]).loss(h, targets, mask)
