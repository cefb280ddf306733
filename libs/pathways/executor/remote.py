"""Remote executor: the Executor interface over a chain of ModuleService servers.

Each module may have several replicas, listed by a `ReplicaSource` (fixed addresses, or Kubernetes
discovery) that is asked again for every new session, so replicas can come and go at runtime.
Sessions are spread over replicas (fewest open sessions first) and stick to the replica holding
their KV cache. When a replica fails or goes away (UNAVAILABLE; CANCELLED by a server shutting
down, see `failover.GONE`) or forgets a session (NOT_FOUND after a restart or TTL), the session
moves to another replica by replaying the exact calls it made to that module,
so the cache and the generated text come out identical.

The parts live beside it: `replicas` (the pool of channels per module), `failover` (module
sessions, opening and moving them by replay), `decode_stream` (a session's decode steps on one
stream, and grouped steps as one message), `lockstep` (lining sessions' steps up).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence

import grpc
import numpy as np

from pathways import codec, messages, transport
from pathways.executor.base import Session, StepResult, forward_input, pad_prompts
from pathways.executor.decode_stream import DecodeStream, send_group, session_stream
from pathways.executor.failover import GONE, MOVE, ModuleSession, move, open_on
from pathways.executor.lockstep import Entry, Lockstep
from pathways.executor.replicas import (
    HostedSource,
    RemoteError,
    ReplicaSet,
    ReplicaSource,
    StaticReplicaSource,
    replica_error,
)
from pathways.modules import registry
from pathways.sampling import SamplingParams
from pathways.spec import PathwaySpec
from pathways.v1 import module_pb2


class RemoteExecutor:
    """Runs pathways of `spec` on module servers.

    Args:
        endpoints: module name -> replica addresses (fixed; pathways needing a module not listed
            are not served), or a `ReplicaSource` asked for a module's replicas on every new
            session (discovery: every pathway is served; a module listing no replica fails
            new sessions with UNAVAILABLE until one appears).
        wire_dtype: activations between modules ("float32" is exact; "bfloat16" halves bytes).
        call_timeout_s: per-call deadline, shortened to any deadline set with `deadline()`.
        max_attempts: tries of one call across replicas before giving up.
        decode_streams: send a session's decode steps over one bidi stream per module (less
            per-step overhead than unary calls); the stream's deadline is the caller's, or
            `stream_horizon_s` ahead (then renewed).
        lockstep_wait_s: how long a session's decode step may wait at a module for the other
            sessions decoding through this executor to catch up, so the server batches them
            (see `lockstep`); 0 sends every step at once.
        group_steps: the decode steps that lockstep lines up at a replica go as one message,
            sent by one of the sessions (its stream, its deadline); a step that fails in the group
            is re-sent alone by its own session (which then moves it if its replica failed).
        step_timing: ask every module where each decode step's time went; `step_timings[m]`
            keeps the last 4096 steps' (call µs as this client saw it, lockstep wait included,
            the server handler's µs, the step's µs).
        tls: TLS settings of the channels to module servers (default: this process's,
            `transport.default()`).
        colocated: groups of consecutive modules each hosted by one server (`--module a,b`),
            which a `ReplicaSource` lists under "a+b" (Kubernetes: one Service per group); a
            step through a group is one call. Fixed `endpoints` need none: modules listed at
            the same addresses are taken as one server's.
    """

    def __init__(
        self,
        spec: PathwaySpec,
        endpoints: dict[str, list[str]] | ReplicaSource,
        *,
        wire_dtype: str = "float32",
        call_timeout_s: float = 60.0,
        max_attempts: int = 3,
        max_message_mb: float = 64.0,
        decode_streams: bool = True,
        stream_horizon_s: float = 600.0,
        lockstep_wait_s: float = 0.02,
        group_steps: bool = True,
        step_timing: bool = False,
        tls: transport.TLSConfig | None = None,
        colocated: Sequence[Sequence[str]] = (),
    ):
        self.spec = spec
        self.tls = transport.default() if tls is None else tls
        self.lockstep = Lockstep(lockstep_wait_s)
        if isinstance(endpoints, dict):
            unknown = sorted(set(endpoints) - set(spec.modules))
            if unknown:
                raise ValueError(
                    f"unknown module(s) {', '.join(unknown)}; known: " f"{', '.join(spec.modules)}"
                )
            for m, addresses in endpoints.items():
                if not addresses:
                    raise ValueError(f"module {m!r} has no replica addresses")
            modules, source = list(endpoints), StaticReplicaSource(endpoints)
            self._static = {m: list(a) for m, a in endpoints.items()}
        else:
            modules, source, self._static = list(spec.modules), endpoints, None
        self._server = {}  # a co-located module -> its server's name ("a+b")
        if colocated:
            if self._static is not None:
                raise ValueError(
                    "colocated groups go with a ReplicaSource; fixed endpoints list a group's "
                    "modules at the same addresses"
                )
            source = HostedSource(source, colocated)
            self._server = source.server
        self._source = source
        missing = sorted({m for p in spec.pathways.values() for m in p.modules} - set(modules))
        self.served = {
            name for name, p in spec.pathways.items() if not set(p.modules) & set(missing)
        }
        options = transport.grpc_options(max_message_mb)
        self.replicas = {m: ReplicaSet(m, source, options, tls=self.tls) for m in modules}
        self._options = options
        self._table_lock = threading.Lock()
        self.wire = codec.dtype_of(wire_dtype)
        self.call_timeout_s, self.max_attempts = call_timeout_s, max_attempts
        self.decode_streams, self.stream_horizon_s = decode_streams, stream_horizon_s
        self._sessions: dict[str, dict[str, ModuleSession]] = {}
        self._local = threading.local()
        # Serialized bytes sent to / received from each module by session calls (benchmarks).
        self.wire_bytes: dict[str, list[int]] = {m: [0, 0] for m in modules}
        self.step_timing = step_timing
        self.group_steps = group_steps and decode_streams
        # Decode steps by how they went (diagnostics, counted without a lock): alone, in a
        # group message (as its sender or a member), or re-sent alone after failing in a group.
        self.step_counts = {"alone": 0, "grouped": 0, "regrouped_alone": 0}
        self.step_timings: dict[str, collections.deque[tuple[int, int, int]]] = {
            m: collections.deque(maxlen=4096) for m in modules
        }
        # Called with (hop, method, seconds) after each session step's call to a hop, as this
        # client saw it (a decode step's lockstep wait included): the gateway's hop latency.
        self.on_hop: Callable[[str, str, float], None] | None = None
        # Module sessions moved to another replica, by (hop, the status that moved them), and
        # the same as a callback (the gateway's session-move counter).
        self.moves: collections.Counter[tuple[str, str]] = collections.Counter()
        self.on_move: Callable[[str, str], None] | None = None
        self._closed = False

    def close(self) -> None:
        """Closes the sessions still open (their steps in flight end CANCELLED, and are not
        moved), so the module servers free their KV-cache rows now rather than at their TTL
        (a gateway stopping with generations cut by its grace), then the channels."""
        self._closed = True
        end = time.monotonic() + 5.0  # all of them, so an unreachable server cannot hold it up
        for sid in list(self._sessions):
            self._close_module_sessions(sid, timeout=min(2.0, max(0.01, end - time.monotonic())))
        for rs in self.replicas.values():
            rs.close()

    # ---- deadlines ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def deadline(self, seconds: float | None):
        """Calls made by this thread inside the block finish within `seconds` from now."""
        prev = getattr(self._local, "deadline", None)
        self._local.deadline = None if seconds is None else time.monotonic() + seconds
        try:
            yield
        finally:
            self._local.deadline = prev

    def _timeout(self, module: str) -> float:
        dl = getattr(self._local, "deadline", None)
        if dl is None:
            return self.call_timeout_s
        left = dl - time.monotonic()
        if left <= 0:
            raise RemoteError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline exceeded before calling module {module!r}",
            )
        return min(left, self.call_timeout_s)

    # ---- live pathway table ------------------------------------------------------------------
    def add_module(self, name: str, cfg, addresses: list[str]) -> None:
        """Makes a newly started module service usable by pathways (static endpoints)."""
        if not addresses:
            raise ValueError(f"module {name!r} needs at least one replica address")
        with self._table_lock:
            spec = self.spec.with_module(name, cfg)
            if self._static is not None:
                self._static[name] = list(addresses)
            if name not in self.replicas:
                self.replicas[name] = ReplicaSet(
                    name, StaticReplicaSource({name: addresses}), self._options, tls=self.tls
                )
                self.wire_bytes[name] = [0, 0]
            self._set_spec(spec)

    def set_pathway(self, name: str, modules: list[str]) -> None:
        """Adds or replaces pathway `name`. Open sessions keep the modules they started with."""
        with self._table_lock:
            missing = [m for m in modules if m in self.spec.modules and m not in self.replicas]
            if missing:
                raise ValueError(
                    f"pathway {name!r} needs module(s) with no replicas: " f"{', '.join(missing)}"
                )
            self._set_spec(self.spec.with_pathway(name, modules))

    def remove_pathway(self, name: str) -> None:
        with self._table_lock:
            self._set_spec(self.spec.without_pathway(name))

    def _set_spec(self, spec: PathwaySpec) -> None:
        served = {n for n, p in spec.pathways.items() if set(p.modules) <= set(self.replicas)}
        # One assignment each: a reader sees the old table or the new one, never a mix that
        # matters (sessions hold their own module chain).
        self.spec, self.served = spec, served

    def _hops(self, modules) -> list[tuple[str, list[str]]]:
        """The calls a step through `modules` makes, as (name, modules): consecutive modules
        listed at the same addresses, or in one of `colocated`'s groups, are served by one server
        hosting them as one chain (`--module a,b`: one program per step), so they are one call,
        named "a+b" (its replicas, wire bytes and timings are counted under that name)."""
        groups: list[list[str]] = []
        static = self._static or {}
        for m in modules:
            prev = groups[-1][-1] if groups else None
            if prev is not None and (
                (m in static and static[m] == static.get(prev))
                or (m in self._server and self._server[m] == self._server.get(prev))
            ):
                groups[-1].append(m)
            else:
                groups.append([m])
        hops = []
        for ms in groups:
            name = "+".join(ms)
            if name not in self.replicas:
                with self._table_lock:
                    if name not in self.replicas:
                        source = (
                            StaticReplicaSource({name: self._static[ms[0]]})
                            if self._static is not None
                            else self._source  # lists a group's server under "a+b"
                        )
                        self.replicas[name] = ReplicaSet(name, source, self._options, tls=self.tls)
                        self.wire_bytes[name] = [0, 0]
                        self.step_timings[name] = collections.deque(maxlen=4096)
            hops.append((name, ms))
        return hops

    def _chain(self, session: Session) -> list[str]:
        """The modules the session was opened on (the pathway may have changed since)."""
        chain = self._sessions.get(session.id)
        if chain is None:
            raise RemoteError(grpc.StatusCode.NOT_FOUND, f"unknown session {session.id!r}")
        return list(chain)

    # ---- sessions ----------------------------------------------------------------------------
    def _pathway(self, pathway: str):
        p = self.spec.pathway(pathway)
        if pathway not in self.served:
            raise ValueError(
                f"pathway {pathway!r} needs modules with no replicas: "
                f"{', '.join(m for m in p.modules if m not in self.replicas)}"
            )
        return p

    def open_session(self, pathway: str, sampling: list[SamplingParams]) -> Session:
        if self._closed:
            raise RemoteError(grpc.StatusCode.UNAVAILABLE, "this executor is closed")
        p = self._pathway(pathway)
        session = Session.new(pathway, sampling, p.max_seq_len)
        b = session.batch_size
        rows = [messages.row_sampling(s) for s in sampling]
        opened: dict[str, ModuleSession] = {}
        self._sessions[session.id] = opened
        try:
            for hop, ms in self._hops(p.modules):
                kinds = [registry.of(self.spec.modules[m]) for m in ms]
                req = module_pb2.OpenSessionRequest(
                    batch_size=b,
                    max_seq_len=p.max_seq_len,
                    sampling=rows if kinds[-1].is_head else [],
                    modules=ms,
                )
                opened[hop] = open_on(
                    self.replicas[hop],
                    hop,
                    req,
                    [] if any(k.has_cache for k in kinds) else None,
                    functools.partial(self._timeout, hop),
                )
        except BaseException:
            self.close_session(session)
            raise
        return session

    def close_session(self, session: Session) -> None:
        self._close_module_sessions(session.id)

    def _close_module_sessions(self, session_id: str, timeout: float = 5.0) -> None:
        self.lockstep.leave(session_id)
        for module, ms in self._sessions.pop(session_id, {}).items():
            ms.drop_stream()
            try:
                ms.replica.stub.CloseSession(
                    module_pb2.CloseSessionRequest(session_id=ms.session_id), timeout=timeout
                )
            except grpc.RpcError:
                pass  # a dead replica has nothing to free; a live one reclaims it by TTL
            finally:
                self.replicas[module].release(ms.replica)

    def _call(self, session: Session, module: str, method: str, req):
        ms = self._sessions.get(session.id, {}).get(module)
        if ms is None:
            raise KeyError(f"unknown session {session.id!r}")
        for attempt in range(self.max_attempts):
            req.session_id = ms.session_id
            try:
                if method == "Decode" and self.decode_streams:
                    resp = self._stream(module, ms).step(req)
                else:
                    resp = getattr(ms.replica.stub, method)(req, timeout=self._timeout(module))
            except grpc.RpcError as e:
                ms.drop_stream()  # a failed stream is over; the next step opens a new one
                # Closed by another thread (the session or the executor), cancelling this call.
                closed = self._closed or self._sessions.get(session.id, {}).get(module) is not ms
                if e.code() not in MOVE or attempt == self.max_attempts - 1 or closed:
                    raise replica_error(module, ms.replica, e) from None
                self.moves[module, e.code().name] += 1
                if self.on_move is not None:
                    self.on_move(module, e.code().name)
                move(
                    self.replicas[module],
                    module,
                    ms,
                    e.code() in GONE,
                    self.max_attempts,
                    functools.partial(self._timeout, module),
                )
                continue
            self._record(module, ms, method, req, resp)
            return resp
        raise AssertionError("unreachable")

    def _record(self, module: str, ms: ModuleSession, method: str, req, resp) -> None:
        counts = self.wire_bytes[module]
        counts[0] += req.ByteSize()
        counts[1] += resp.ByteSize()
        if ms.replay is not None:
            if method == "Prefill" and not any(req.starts):
                # Every row is written again from position 0 (an episode's full window): what
                # the session's later steps read no longer depends on the calls before.
                ms.replay.clear()
            ms.replay.append((method, req))

    def _decode_call(self, session: Session, chain: tuple[str, ...], i: int, req):
        """chain[i]'s decode step for `session`, in lockstep with the other sessions (and in one
        message with those bound for the same replica, with `group_steps`)."""
        module = chain[i]
        if not self.group_steps:
            self.lockstep.arrive(session.id, chain, i)
            self.step_counts["alone"] += 1
            return self._call(session, module, "Decode", req)
        ms = self._sessions.get(session.id, {}).get(module)
        if ms is None:
            raise KeyError(f"unknown session {session.id!r}")
        req.session_id = ms.session_id
        entry = Entry(ms.replica, (session.id, ms, req, chain))
        group = self.lockstep.arrive(session.id, chain, i, entry)
        if group and len(group) == 1:
            self.step_counts["alone"] += 1
            return self._call(session, module, "Decode", req)
        if group:
            send_group(self.lockstep, module, group, functools.partial(self._stream, module))
        elif not entry.wait(self._timeout(module)):
            raise RemoteError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline exceeded waiting for module {module!r} (a step sent with others)",
            )
        if entry.result is None:  # failed in the group: alone now, with the usual recovery
            self.step_counts["regrouped_alone"] += 1
            return self._call(session, module, "Decode", req)
        self.step_counts["grouped"] += 1
        self._record(module, ms, "Decode", req, entry.result)
        return entry.result

    def _stream(self, module: str, ms: ModuleSession) -> DecodeStream:
        return session_stream(
            ms,
            getattr(self._local, "deadline", None),
            self.stream_horizon_s,
            self.call_timeout_s,
            functools.partial(self._timeout, module),
        )

    # ---- steps -------------------------------------------------------------------------------
    def prefill(self, session: Session, prompts: list[list[int]], *, return_logits=False):
        lens = session.check_prompts(prompts)
        tokens, _, _ = pad_prompts(prompts, session.lengths, session.max_seq_len)
        resp = self._prefill(session, tokens, session.lengths.copy(), lens, return_logits)
        return _result(resp)

    def prefill_inputs(self, session: Session, x, starts=None, *, return_logits: bool = False):
        """A prefill of what the pathway's first module reads, (B, T, ...) with every row T
        positions long (an episode's observations), at `starts` (B,) (default: after each row's
        cached positions; 0 writes a window again from the start, and the session's replay
        then starts there). Returns the head's (output, logits or None) as they came: a head
        that is not a next-token one has no tokens to cast them to."""
        x = forward_input(x)
        b, t = x.shape[:2]
        starts = session.lengths.copy() if starts is None else np.asarray(starts, np.int32)
        if b != session.batch_size or starts.shape != (b,) or t < 1:
            raise ValueError(
                f"prefill_inputs got shape {list(x.shape)} and starts {starts.tolist()} for a "
                f"session of {session.batch_size} rows"
            )
        lens = np.full(b, t, np.int32)
        if int((starts + lens).max()) > session.max_seq_len:
            raise ValueError(
                f"max sequence length exceeded: {int((starts + lens).max())} positions > "
                f"pathway {session.pathway!r} max_seq_len {session.max_seq_len}"
            )
        return _raw(self._prefill(session, x, starts, lens, return_logits))

    def _prefill(self, session: Session, x, starts, lens, return_logits: bool):
        self.lockstep.leave(session.id)  # a prefill runs alone; decoding sessions go on
        x, resp = codec.encode(x), None
        for m in self._chain(session):
            req = module_pb2.PrefillRequest(
                input=x,
                starts=starts.tolist(),
                lengths=lens.tolist(),
                steps=session.steps.tolist(),
                output_dtype=self.wire,
                return_logits=return_logits,
            )
            t0 = time.perf_counter()
            resp = self._call(session, m, "Prefill", req)
            if self.on_hop is not None:
                self.on_hop(m, "Prefill", time.perf_counter() - t0)
            x = resp.output
        session.lengths = starts + lens
        session.steps += 1
        return resp

    def decode(self, session: Session, tokens, *, return_logits=False):
        tokens = np.asarray(tokens, np.int32).reshape(session.batch_size, 1)
        return _result(self._decode(session, tokens, return_logits))

    def decode_inputs(self, session: Session, x, *, return_logits: bool = False):
        """One decode step of what the first module reads, (B, 1, ...) (an observation per
        row), at each row's next position: the head's (output, logits or None) as they came."""
        x = forward_input(x)
        if x.shape[:2] != (session.batch_size, 1):
            raise ValueError(
                f"decode_inputs needs shape ({session.batch_size}, 1, ...); got {list(x.shape)}"
            )
        return _raw(self._decode(session, x, return_logits))

    def _decode(self, session: Session, x, return_logits: bool):
        session.check_room(np.ones(session.batch_size, np.int32))
        x, resp = codec.encode(x), None
        chain = tuple(self._chain(session))
        positions, steps = session.lengths.tolist(), session.steps.tolist()  # once per token
        try:
            for i, m in enumerate(chain):
                req = module_pb2.DecodeRequest(
                    input=x,
                    positions=positions,
                    steps=steps,
                    output_dtype=self.wire,
                    return_logits=return_logits,
                    return_timing=self.step_timing,
                )
                t0 = time.perf_counter_ns()
                resp = self._decode_call(session, chain, i, req)
                if self.step_timing:
                    t = resp.timing
                    self.step_timings[m].append(
                        ((time.perf_counter_ns() - t0) // 1000, t.handler_us, t.step_us)
                    )
                if self.on_hop is not None:
                    self.on_hop(m, "Decode", (time.perf_counter_ns() - t0) * 1e-9)
                x = resp.output
        except BaseException:
            self.lockstep.leave(session.id)
            raise
        self.lockstep.done(session.id, chain)
        session.lengths += 1
        session.steps += 1
        return resp

    # ---- stateless ---------------------------------------------------------------------------
    def forward(self, pathway: str, inputs, *, head: bool = True) -> np.ndarray:
        p = self._pathway(pathway)
        x = codec.encode(forward_input(inputs))
        for m, ms in self._hops(p.modules if head else p.modules[:-1]):
            rset = self.replicas[m]
            # The pathway's mask travels with the call: attention modules are shared by
            # causal (text) and bidirectional (image, utterance) pathways. A hop without the
            # head of a server that also hosts it runs the first modules only.
            req = module_pb2.ForwardRequest(
                input=x, output_dtype=self.wire, bidirectional=not p.causal, modules=ms
            )
            t0 = time.perf_counter()
            for attempt in range(self.max_attempts):
                r = rset.acquire()
                if r is None:
                    raise replica_error(m, None, None)
                try:
                    x = r.stub.Forward(req, timeout=self._timeout(m)).output
                    break
                except grpc.RpcError as e:
                    if e.code() not in GONE or attempt == self.max_attempts - 1:
                        raise replica_error(m, r, e) from None
                    rset.mark_down(r)
                finally:
                    rset.release(r)
            if self.on_hop is not None:
                self.on_hop(m, "Forward", time.perf_counter() - t0)
        return codec.decode(x, "output")

    def loss(self, pathway: str, inputs, targets) -> float:
        logits = self.forward(pathway, inputs).astype(np.float64)  # (B, T, V)
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp, np.asarray(targets)[..., None], axis=-1)
        return float(-picked.mean())

    def loss_and_grads(self, pathway: str, inputs, targets, *, grads: bool = True):
        if grads:
            # By design each module's gradients stay inside its own service (TrainingService):
            # only activations and activation-gradients cross the wire.
            raise ValueError(
                "parameter gradients stay inside each module service: train through the "
                "services with train.PipelineEngine(pipeline.client.remote_stages(...)), "
                "or compute them in one process with LocalExecutor"
            )
        return self.loss(pathway, inputs, targets), None


def _raw(resp) -> tuple[np.ndarray, np.ndarray | None]:
    logits = codec.decode(resp.logits, "logits") if resp.HasField("logits") else None
    return codec.decode(resp.output, "output"), logits


def _result(resp) -> StepResult:
    out, logits = _raw(resp)
    return StepResult(tokens=out.astype(np.int32), logits=logits)
