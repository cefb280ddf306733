"""Remote executor: the Executor interface over a chain of ModuleService servers.

Each module may have several replicas, listed by a `ReplicaSource` (fixed addresses, or Kubernetes
discovery) that is asked again for every new session, so replicas can come and go at runtime.
Sessions are spread over replicas (fewest open sessions first) and stick to the replica holding
their KV cache. When a replica fails (UNAVAILABLE) or forgets a session (NOT_FOUND after a restart
or TTL), the session moves to another replica by replaying the exact calls it made to that module,
so the cache and the generated text come out identical.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import threading
import time

import grpc
import numpy as np

from pathways import codec, telemetry
from pathways.executor.base import Session, StepResult, pad_prompts
from pathways.executor.decode_stream import DecodeStream
from pathways.executor.lockstep import Entry, Lockstep
from pathways.executor.replicas import ReplicaSource, StaticReplicaSource
from pathways.modules import registry
from pathways.sampling import SamplingParams
from pathways.spec import PathwaySpec
from pathways.v1 import module_pb2, module_pb2_grpc

_MOVE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)


class RemoteError(Exception):
    """A module call failed; `code` is the gRPC status (pass it on), the message names the module."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Replica:
    def __init__(self, module: str, address: str, options):
        self.module, self.address = module, address
        self.channel = telemetry.channel(grpc.insecure_channel(address, options=options))
        self.stub = module_pb2_grpc.ModuleServiceStub(self.channel)
        self.sessions = 0  # module sessions (and in-flight stateless calls) holding it
        self.down_until = 0.0
        self.retired = False  # no longer listed by the source: gets nothing new


class ReplicaSet:
    """The replicas of one module as its source lists them now; hands out the least loaded one.

    The source is asked on every `acquire`, so a new session can go to a replica listed a moment
    ago and a replica no longer listed gets no new sessions. Sessions already on a retired replica
    keep it (its channel closes when the last one is released); if it stops answering they move by
    replay, as after any failure.
    """

    def __init__(self, module: str, source: ReplicaSource, options, cooldown_s: float = 2.0):
        self.module, self.source, self.options, self.cooldown_s = (
            module,
            source,
            options,
            cooldown_s,
        )
        self.replicas: list[Replica] = []  # the current pool, in the source's order
        self._held: dict[str, Replica] = {}  # the pool plus retired replicas still in use
        self._rr = itertools.count()
        self._lock = threading.Lock()

    def _refresh(self) -> None:  # with self._lock held
        addresses = list(dict.fromkeys(self.source.replicas(self.module)))
        if addresses == [r.address for r in self.replicas]:
            return
        pool = []
        for a in addresses:
            r = self._held.get(a)
            if r is None:
                r = self._held[a] = Replica(self.module, a, self.options)
            r.retired = False  # an address may come back (a replica Ready again)
            pool.append(r)
        for r in self.replicas:
            if r not in pool:
                r.retired = True
                if r.sessions <= 0:
                    self._drop(r)
        self.replicas = pool

    def _drop(self, r: Replica) -> None:
        r.channel.close()
        del self._held[r.address]

    def size(self) -> int:
        with self._lock:
            self._refresh()
            return len(self.replicas)

    def acquire(self, exclude: tuple[Replica, ...] = ()) -> Replica | None:
        """The least loaded healthy replica, held until `release`; None when there is none."""
        with self._lock:
            self._refresh()
            if not self.replicas:
                return None
            now, start, n = time.monotonic(), next(self._rr), len(self.replicas)
            order = [self.replicas[(start + i) % n] for i in range(n)]
            up = [r for r in order if r.down_until <= now and r not in exclude]
            pool = up or [r for r in order if r not in exclude] or order
            r = min(pool, key=lambda r: r.sessions)
            r.sessions += 1
            return r

    def release(self, r: Replica) -> None:
        with self._lock:
            r.sessions -= 1
            if r.retired and r.sessions <= 0 and self._held.get(r.address) is r:
                self._drop(r)

    def tried_all(self, tried: list[Replica]) -> bool:
        return all(r in tried for r in self.replicas)

    def mark_down(self, r: Replica) -> None:
        r.down_until = time.monotonic() + self.cooldown_s

    def close(self) -> None:
        with self._lock:
            for r in self._held.values():
                r.channel.close()
            self._held.clear()
            self.replicas = []


@dataclasses.dataclass
class _ModuleSession:
    replica: Replica
    session_id: str
    open_request: module_pb2.OpenSessionRequest
    replay: list | None  # (method, request) calls made, kept for stateful (attention) modules
    stream: DecodeStream | None = None

    def drop_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


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
    ):
        self.spec = spec
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
        else:
            modules, source = list(spec.modules), endpoints
        missing = sorted({m for p in spec.pathways.values() for m in p.modules} - set(modules))
        self.served = {
            name for name, p in spec.pathways.items() if not set(p.modules) & set(missing)
        }
        n = int(max_message_mb * 2**20)
        options = [("grpc.max_receive_message_length", n), ("grpc.max_send_message_length", n)]
        self.replicas = {m: ReplicaSet(m, source, options) for m in modules}
        self._options = options
        self._table_lock = threading.Lock()
        self.wire = codec.dtype_of(wire_dtype)
        self.call_timeout_s, self.max_attempts = call_timeout_s, max_attempts
        self.decode_streams, self.stream_horizon_s = decode_streams, stream_horizon_s
        self._sessions: dict[str, dict[str, _ModuleSession]] = {}
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

    def close(self) -> None:
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
            if name not in self.replicas:
                self.replicas[name] = ReplicaSet(
                    name, StaticReplicaSource({name: addresses}), self._options
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
        p = self._pathway(pathway)
        session = Session.new(pathway, sampling, p.max_seq_len)
        b = session.batch_size
        rows = [
            module_pb2.RowSampling(
                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed
            )
            for s in sampling
        ]
        opened: dict[str, _ModuleSession] = {}
        self._sessions[session.id] = opened
        try:
            for m in p.modules:
                kind = registry.of(self.spec.modules[m])
                req = module_pb2.OpenSessionRequest(
                    batch_size=b,
                    max_seq_len=p.max_seq_len,
                    sampling=rows if kind.is_head else [],
                )
                opened[m] = self._open(m, req, [] if kind.has_cache else None)
        except BaseException:
            self.close_session(session)
            raise
        return session

    def _open(self, module: str, req, replay, exclude=()) -> _ModuleSession:
        rset, tried, last = self.replicas[module], list(exclude), None
        for _ in range(rset.size() + 1):
            r = rset.acquire(tuple(tried))
            if r is None:
                break
            try:
                resp = r.stub.OpenSession(req, timeout=self._timeout(module))
            except grpc.RpcError as e:
                rset.release(r)
                last = e
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        rset.mark_down(r)
                    tried.append(r)
                    if rset.tried_all(tried):
                        break
                    continue
                raise _error(module, r, e) from None
            return _ModuleSession(r, resp.session_id, req, replay)
        raise _error(module, None, last)

    def close_session(self, session: Session) -> None:
        self.lockstep.leave(session.id)
        for module, ms in self._sessions.pop(session.id, {}).items():
            ms.drop_stream()
            try:
                ms.replica.stub.CloseSession(
                    module_pb2.CloseSessionRequest(session_id=ms.session_id), timeout=5.0
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
                if e.code() not in _MOVE or attempt == self.max_attempts - 1:
                    raise _error(module, ms.replica, e) from None
                self._move(module, ms, failed=e.code() == grpc.StatusCode.UNAVAILABLE)
                continue
            self._record(module, ms, method, req, resp)
            return resp
        raise AssertionError("unreachable")

    def _record(self, module: str, ms: _ModuleSession, method: str, req, resp) -> None:
        counts = self.wire_bytes[module]
        counts[0] += req.ByteSize()
        counts[1] += resp.ByteSize()
        if ms.replay is not None:
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
            self._send_group(module, group)
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

    def _send_group(self, module: str, group: list[Entry]) -> None:
        """Sends the group's steps on the first entry's stream; hands every entry its response,
        or None (it failed here: its session re-sends it alone)."""
        results: list = [None] * len(group)
        sender: _ModuleSession = group[0].item[1]
        try:
            reqs = []
            for e in group:
                _, ms, req, _ = e.item
                req.session_id = ms.session_id
                reqs.append(req)
            out = self._stream(module, sender).group(reqs)
            if len(out) == len(group):
                results = [r.step if r.code == 0 else None for r in out]
        except grpc.RpcError:
            sender.drop_stream()  # a failed stream is over; every step goes again alone
        finally:
            for e, r in zip(group, results):
                session_id, _, _, chain = e.item
                if r is not None and chain[-1] == module:
                    # Its step is over (as it will say when it wakes): the sender, first to the
                    # next step, must not find it "ahead" of the first module and go alone.
                    self.lockstep.done(session_id, chain)
            self.lockstep.hand_over(module, list(zip(group, results)))

    def _stream(self, module: str, ms: _ModuleSession) -> DecodeStream:
        dl = getattr(self._local, "deadline", None)
        now = time.monotonic()
        if dl is None:
            dl = now + self.stream_horizon_s
            if ms.stream is not None and ms.stream.deadline - now < self.call_timeout_s:
                ms.drop_stream()  # renew before the horizon cuts a step short
        elif ms.stream is not None and ms.stream.deadline != dl:
            ms.drop_stream()
        if ms.stream is None:
            self._timeout(module)  # raises when the caller's deadline has passed
            ms.stream = DecodeStream(ms.replica.stub, dl)
        return ms.stream

    def _move(self, module: str, ms: _ModuleSession, failed: bool) -> None:
        """Re-creates a module session on another replica by replaying its calls."""
        rset, old = self.replicas[module], ms.replica
        if failed:
            rset.mark_down(old)
        for _ in range(self.max_attempts):
            new = self._open(module, ms.open_request, ms.replay, exclude=(old,) if failed else ())
            rset.release(old)  # ms always holds exactly one replica, also when _open raises
            ms.replica, ms.session_id = new.replica, new.session_id
            try:
                for method, req in ms.replay or ():
                    req.session_id = ms.session_id
                    getattr(ms.replica.stub, method)(req, timeout=self._timeout(module))
                return
            except grpc.RpcError as e:
                if e.code() not in _MOVE:
                    raise _error(module, ms.replica, e) from None
                rset.mark_down(ms.replica)
                old = ms.replica
        raise RemoteError(
            grpc.StatusCode.UNAVAILABLE,
            f"module {module!r}: no replica could take over the session",
        )

    # ---- steps -------------------------------------------------------------------------------
    def prefill(self, session: Session, prompts: list[list[int]], *, return_logits=False):
        lens = session.check_prompts(prompts)
        self.lockstep.leave(session.id)  # a prefill runs alone; decoding sessions go on
        tokens, _, _ = pad_prompts(prompts, session.lengths, session.max_seq_len)
        x = codec.encode(tokens)
        resp = None
        for m in self._chain(session):
            req = module_pb2.PrefillRequest(
                input=x,
                starts=session.lengths.tolist(),
                lengths=lens.tolist(),
                steps=session.steps.tolist(),
                output_dtype=self.wire,
                return_logits=return_logits,
            )
            resp = self._call(session, m, "Prefill", req)
            x = resp.output
        session.lengths += lens
        session.steps += 1
        return _result(resp)

    def decode(self, session: Session, tokens, *, return_logits=False):
        tokens = np.asarray(tokens, np.int32).reshape(session.batch_size, 1)
        session.check_room(np.ones(session.batch_size, np.int32))
        x, resp = codec.encode(tokens), None
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
                x = resp.output
        except BaseException:
            self.lockstep.leave(session.id)
            raise
        self.lockstep.done(session.id, chain)
        session.lengths += 1
        session.steps += 1
        return _result(resp)

    # ---- stateless ---------------------------------------------------------------------------
    def forward(self, pathway: str, tokens) -> np.ndarray:
        x = codec.encode(np.asarray(tokens, np.int32))
        for m in self._pathway(pathway).modules:
            rset = self.replicas[m]
            req = module_pb2.ForwardRequest(input=x, output_dtype=self.wire)
            for attempt in range(self.max_attempts):
                r = rset.acquire()
                if r is None:
                    raise _error(m, None, None)
                try:
                    x = r.stub.Forward(req, timeout=self._timeout(m)).output
                    break
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.max_attempts - 1:
                        raise _error(m, r, e) from None
                    rset.mark_down(r)
                finally:
                    rset.release(r)
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


def _result(resp) -> StepResult:
    logits = codec.decode(resp.logits, "logits") if resp.HasField("logits") else None
    return StepResult(tokens=codec.decode(resp.output, "output").astype(np.int32), logits=logits)


def _error(module: str, r: Replica | None, e: grpc.RpcError | None) -> RemoteError:
    where = f"module {module!r}" + (f" at {r.address}" if r is not None else "")
    if e is None:
        return RemoteError(grpc.StatusCode.UNAVAILABLE, f"{where}: no replica available")
    return RemoteError(e.code(), f"{where}: {e.details()}")
