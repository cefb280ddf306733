"""`pathways.v1.ModuleService` over a chain of module engines (`ChainEngine`: the server's one module,
or several): validation, sessions, batching, status codes."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time

import grpc
import numpy as np

from pathways import codec, messages, transport
from pathways.config import to_dict
from pathways.executor.base import bucket, padded_length
from pathways.sampling import SamplingBatch
from pathways.serving.batcher import Batcher
from pathways.serving.chain import ChainEngine, Step
from pathways.serving.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServingError,
    Unavailable,
)
from pathways.serving.limits import LimitExceeded, MemoryBudget, positions_field
from pathways.serving.sessions import SessionTable
from pathways.telemetry import ModuleMetrics
from pathways.transport import rpc
from pathways.v1 import module_pb2, module_pb2_grpc

log = logging.getLogger(__name__)


def _rows(values, field: str, b: int, lo: int, hi: int | None = None) -> np.ndarray:
    # Plain Python over the few values of a step: each numpy call costs ~10x more than its
    # hot cost on a server that just woke up (its caches were evicted while it sat idle).
    v = list(values)
    if len(v) != b:
        raise InvalidArgument(f"{field} has {len(v)} entries; the session has {b} rows")
    top = 2**31 - 1 if hi is None else hi
    for i, x in enumerate(v):
        if x < lo or x > top:
            rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise InvalidArgument(f"{field}[{i}] = {x} is outside {rng}")
    return np.array(v, np.int32)


def _failed(e: BaseException) -> module_pb2.GroupStepResult:
    code, message = transport.status(e)
    return module_pb2.GroupStepResult(code=code.value[0], message=message)


class ModuleServicer(module_pb2_grpc.ModuleServiceServicer):
    def __init__(
        self,
        engine: ChainEngine,
        table: SessionTable,
        max_batch: int,
        batch_wait_s: float,
        max_call_tokens: int | None = None,
        budget: MemoryBudget | None = None,
    ):
        """`max_call_tokens`: rows x positions one Prefill or Forward may carry; `budget`: the
        server's memory budget, reserved around each Prefill and Forward (None: unbounded)."""
        self.engine, self.table = engine, table
        self.engines = engine.engines  # the modules served, in order
        self.names = [e.name for e in self.engines]
        self.max_call_tokens, self.budget = max_call_tokens, budget
        # Publish: who may call it (auth.PeerPolicy; None: anyone, in-process use), where its
        # checkpoints may be read (paths.Roots; None: anywhere), and the training copy's
        # weights when TrainingService is mounted (set by it).
        self.publishers = None
        self.roots = None
        self.training_state = None
        self.metrics = ModuleMetrics(engine.name, lambda: len(table), lambda: engine.kv_bytes)
        self.batcher = Batcher(engine.decode, max_batch, batch_wait_s, self.metrics.batch)
        self.ready = False
        self.requests = 0  # calls handled (see DescribeResponse.requests)
        self._requests_lock = threading.Lock()

    def count_request(self, reset: bool = False) -> None:
        with self._requests_lock:
            self.requests = 0 if reset else self.requests + 1

    def _check_ready(self):
        if not self.ready:
            raise Unavailable(f"module {self.engine.name!r} is loading or shutting down")

    def decode_input(self, t, field: str) -> np.ndarray:
        """A request tensor decoded, refused first when it holds more elements than
        max_call_tokens rows x positions of this module's input allow (a decoded int8 or
        bfloat16 tensor is 4x or 2x its bytes)."""
        if self.max_call_tokens is not None:
            kind, dim = self.engine.cfg.input_contract
            per_token = 1 if kind == "tokens" else max(1, dim)
            n = math.prod(max(0, d) for d in t.shape)
            if n > self.max_call_tokens * per_token:
                raise LimitExceeded(
                    f"{field} has {n} elements, over max_call_tokens = {self.max_call_tokens} "
                    f"positions of {per_token} (--max-call-tokens / PATHWAYS_MAX_CALL_TOKENS)"
                )
        return codec.decode(t, field)

    def check_tokens(self, rows: int, positions: int, field: str) -> None:
        """rows x positions of one call within max_call_tokens (RESOURCE_EXHAUSTED naming it)."""
        if self.max_call_tokens is not None and rows * positions > self.max_call_tokens:
            raise LimitExceeded(
                f"{field} has {rows} rows x {positions} positions = {rows * positions}, over "
                f"max_call_tokens = {self.max_call_tokens} (--max-call-tokens / "
                f"PATHWAYS_MAX_CALL_TOKENS)"
            )

    def reserve(self, rows: int, positions: int, window: int, what: str):
        """The memory budget held for one step of rows x positions (a no-op without one)."""
        if self.budget is None:
            return contextlib.nullcontext()
        return self.budget.reserve(self.engine.activation_bytes(rows, positions, window), what)

    @rpc
    def Describe(self, request, context):
        e = self.engine
        (ik, idim), (ok, odim) = e.cfg.input_contract, e.cfg.output_contract
        return module_pb2.DescribeResponse(
            name=e.name,
            kind=e.kind.name,
            config_json=json.dumps(to_dict(e.cfg)),
            input_kind=ik,
            input_dim=idim,
            output_kind=ok,
            output_dim=odim,
            max_seq_len=e.max_seq_len,
            capacity=self.table.capacity,
            in_use=self.table.in_use,
            sessions=len(self.table),
            requests=self.requests,
            modules=self.names,
        )

    def _check_modules(self, asked, field: str, prefix: bool = False) -> int:
        """How many of the served modules a call names (`asked`, in order; empty: all of them):
        all of them, or with `prefix` the first ones. INVALID_ARGUMENT otherwise."""
        asked = list(asked)
        if not asked:
            return len(self.names)
        if (asked == self.names[: len(asked)]) if prefix else (asked == self.names):
            return len(asked)
        want = "the first ones of" if prefix else "exactly"
        raise InvalidArgument(
            f"{field} {asked} must be {want} the modules this server hosts, in order: "
            f"{self.names}"
        )

    @rpc
    def OpenSession(self, request, context):
        self._check_ready()
        self._check_modules(request.modules, "modules")
        b = request.batch_size
        if b <= 0 or b > self.table.capacity:
            raise InvalidArgument(f"batch_size must be in [1, {self.table.capacity}]; got {b}")
        limit = self.engine.max_seq_len or 2**31 - 1
        msl = request.max_seq_len or limit
        if not 0 < msl <= limit:
            raise InvalidArgument(
                f"max_seq_len {request.max_seq_len} exceeds module "
                f"{self.engine.name!r} max_seq_len {limit}"
            )
        sampling = None
        if self.engine.kind.is_head:
            rows = list(request.sampling) or [module_pb2.RowSampling(top_p=1.0)] * b
            if len(rows) != b:
                raise InvalidArgument(f"sampling has {len(rows)} entries for batch_size {b}")
            try:
                params = [messages.sampling_from_row(r) for r in rows]
            except ValueError as err:
                raise InvalidArgument(f"sampling: {err}") from None
            sampling = SamplingBatch.of(params)
        s = self.table.open(b, msl, sampling)
        return module_pb2.OpenSessionResponse(session_id=s.id, ttl_s=self.table.ttl_s)

    @rpc
    def CloseSession(self, request, context):
        self.batcher.forget(request.session_id)
        return module_pb2.CloseSessionResponse(closed=self.table.close(request.session_id))

    @rpc
    def Prefill(self, request, context):
        self._check_ready()
        s = self.table.acquire(request.session_id)
        try:
            x = self.decode_input(request.input, "input")
            self.engine.check_input(x, "input", s.batch_size)
            b, t = x.shape[:2]
            if t > s.max_seq_len:
                raise InvalidArgument(
                    f"input has {t} positions; the session's max_seq_len is {s.max_seq_len}"
                )
            tp = padded_length(t, s.max_seq_len)  # as the engine pads
            self.check_tokens(b, tp, "input (padded)")
            lengths = _rows(request.lengths, "lengths", b, 1, t)
            # Bounded before adding: int32 starts near 2**31 would wrap and pass the check.
            starts = _rows(request.starts, "starts", b, 0, s.max_seq_len)
            end = starts + lengths
            if end.max() > s.max_seq_len:
                i = int(np.argmax(end))
                raise InvalidArgument(
                    f"starts[{i}] + lengths[{i}] = {int(end[i])} exceeds the "
                    f"session's max_seq_len {s.max_seq_len}"
                )
            steps = self._steps(request.steps, b)
            with self.reserve(b, tp, int(end.max()), "Prefill"):
                out, logits = self.batcher.call(
                    lambda: self.engine.prefill(
                        s, x, starts, lengths, steps, request.return_logits
                    ),
                    transport.deadline(context),
                )
            return self._encode(module_pb2.PrefillResponse(), out, logits, request.output_dtype)
        finally:
            self.table.release(s)

    @rpc
    def Decode(self, request, context):
        return self._decode(request, transport.deadline(context))

    def DecodeStream(self, request_iterator, context):
        for req in request_iterator:
            if len(req.group) > self.table.capacity:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"group has {len(req.group)} steps; a step per session of at most "
                    f"{self.table.capacity} (the server's session capacity)",
                )
            if req.group:
                yield module_pb2.DecodeStreamResponse(group=self._decode_group(req.group, context))
                continue
            resp = self.Decode(req.step, context)  # aborts the stream on a bad step
            yield module_pb2.DecodeStreamResponse(step=resp)

    def _decode(self, request, deadline):
        t0 = time.perf_counter_ns()
        self._check_ready()
        s = self.table.acquire(request.session_id)
        try:
            step, b = self._step(request, s)
            t1 = time.perf_counter_ns()
            out, logits = self.batcher.decode(step, b, request.return_logits, deadline, key=s.id)
            return self._respond(request, out, logits, t0, t1)
        finally:
            self.table.release(s)

    def _step(self, request, s) -> tuple[Step, int]:
        """A decode request's checked inputs (bad ones raise with the field and value)."""
        x = self.decode_input(request.input, "input")
        self.engine.check_input(x, "input", s.batch_size, t=1)
        b = x.shape[0]
        positions = _rows(request.positions, "positions", b, 0, s.max_seq_len - 1)
        return Step(s, x, positions, self._steps(request.steps, b)), b

    def _respond(self, request, out, logits, t0: int, t1: int):
        """The DecodeResponse; t0: the request taken, t1: its checks done (for StepTiming)."""
        t2 = time.perf_counter_ns()
        resp = self._encode(module_pb2.DecodeResponse(), out, logits, request.output_dtype)
        if request.return_timing:
            timing = resp.timing
            timing.step_us = (t2 - t1) // 1000
            timing.handler_us = (time.perf_counter_ns() - t0) // 1000
        return resp

    def _decode_group(self, requests, context) -> list[module_pb2.GroupStepResult]:
        """Several sessions' decode steps as one batch; each step fails or succeeds on its own."""
        t0 = time.perf_counter_ns()
        deadline = transport.deadline(context)
        results: list = [None] * len(requests)
        ready: list[tuple[int, module_pb2.DecodeRequest, object, Step, int]] = []
        seen: set[str] = set()
        try:
            for i, req in enumerate(requests):
                self.count_request()
                try:
                    self._check_ready()
                    if req.session_id in seen:
                        raise InvalidArgument(
                            f"group[{i}]: session {req.session_id!r} has another step in the group"
                        )
                    seen.add(req.session_id)
                    s = self.table.acquire(req.session_id)
                    try:
                        step, b = self._step(req, s)
                    except BaseException:
                        self.table.release(s)
                        raise
                    ready.append((i, req, s, step, b))
                except (ServingError, codec.CodecError) as e:
                    results[i] = _failed(e)
                except Exception as e:  # noqa: BLE001 - this step fails, the stream goes on
                    log.exception("checking group step %d failed", i)
                    results[i] = _failed(e)
            for want in (False, True):
                part = [r for r in ready if r[1].return_logits == want]
                if not part:
                    continue
                t1 = time.perf_counter_ns()
                try:
                    outs = self.batcher.decode_group(
                        [(step, b, s.id) for _, _, s, step, b in part], want, deadline
                    )
                except ServingError as e:
                    outs = [e] * len(part)
                except Exception as e:  # noqa: BLE001 - every step of the batch gets the error
                    log.exception("group decode step failed")
                    outs = [e] * len(part)
                for (i, req, _, _, _), o in zip(part, outs):
                    if isinstance(o, BaseException):
                        results[i] = _failed(o)
                    else:
                        step = self._respond(req, o[0], o[1], t0, t1)
                        results[i] = module_pb2.GroupStepResult(step=step)
        finally:
            for _, _, s, _, _ in ready:
                self.table.release(s)
            self.metrics.latency("DecodeGroup", (time.perf_counter_ns() - t0) / 1e6)
        return results

    @rpc
    def Forward(self, request, context):
        self._check_ready()
        n = self._check_modules(request.modules, "modules", prefix=True)
        x = codec.decode(request.input, "input")
        self.engine.check_input(x, "input", None)
        if self.engine.max_seq_len and x.shape[1] > self.engine.max_seq_len:
            raise InvalidArgument(
                f"input has {x.shape[1]} positions but module "
                f"{self.engine.name!r} max_seq_len is {self.engine.max_seq_len}"
            )
        b, t = x.shape[:2]
        bp = bucket(b, limit=1 << 30, minimum=1)  # as the engine pads (at most)
        tp = padded_length(t, self.engine.max_seq_len or 1 << 30)
        # Counted as the first module reads them (an audio embedding: frames, not samples).
        tp, field = positions_field(self.engines[0].cfg, "input (padded)", tp)
        self.check_tokens(bp, tp, field)
        with self.reserve(bp, tp, tp, "Forward"):
            if n == len(self.engines):
                out = self.engine.forward(x, causal=not request.bidirectional)
            else:  # the first n modules of a chain
                out = self.engine.forward(x, causal=not request.bidirectional, modules=n)
        return module_pb2.ForwardResponse(output=self._tensor(out, request.output_dtype))

    @rpc
    def Publish(self, request, context):
        """Replaces the served weights: from a checkpoint (the module's config there must equal
        the served one) or from this server's training copy."""
        import jax

        from pathways import checkpoint as ckpt
        from pathways import paths
        from pathways.runtime import streams_weights

        self._check_ready()
        why = self.publishers.refusal(context) if self.publishers is not None else None
        if why:
            raise PermissionDenied(why)
        if request.from_training == bool(request.checkpoint):
            raise InvalidArgument("give exactly one of checkpoint and from_training")
        if request.from_training:
            e = self.engine
            if self.training_state is None:
                raise FailedPrecondition(
                    f"module {e.name!r}: this server has no training copy (start it with "
                    f"--training)"
                )
            import jax.numpy as jnp

            # A copy: training donates its buffers to its next update.
            states = [jax.tree.map(lambda a: jnp.array(a, copy=True), self.training_state())]
            source, streamed = "its training copy", [False]
        else:
            directory = request.checkpoint
            if self.roots is not None:
                try:
                    directory = str(self.roots.check(directory, "checkpoint"))
                except paths.PathError as err:
                    raise PermissionDenied(str(err)) from None
            try:
                spec, _ = ckpt.load_spec(directory)
            except OSError as err:
                raise NotFound(f"checkpoint {request.checkpoint!r}: {err}") from None
            except ValueError as err:
                raise InvalidArgument(f"checkpoint {request.checkpoint!r}: {err}") from None
            for e in self.engines:  # every module checked before any weights change
                cfg = spec.modules.get(e.name)
                if cfg is None or not ckpt.has_module(directory, e.name):
                    raise NotFound(f"checkpoint {request.checkpoint!r} has no module {e.name!r}")
                if cfg != e.cfg:
                    raise FailedPrecondition(
                        f"checkpoint {request.checkpoint!r}: module {e.name!r} has another "
                        f"config than the served one ({cfg} != {e.cfg})"
                    )
            # As at start: bfloat16/int8 weights converted as read (`stream_module`: every
            # module's tree checked first, from its metadata), others read into the modules'
            # abstract shapes; no float32 copy beside the served one.
            streamed = [streams_weights(e.rt.weights, e.rt.mesh) for e in self.engines]
            try:
                shapes = [  # the abstract leaves of each streamed module
                    [x for _, x in ckpt.check_module(directory, e.name, e.cfg)] if stream else None
                    for e, stream in zip(self.engines, streamed)
                ]
            except ValueError as err:
                raise FailedPrecondition(f"checkpoint {request.checkpoint!r}: {err}") from None
            states = [
                abstract if stream else ckpt.restore_module(directory, e.name, e.cfg)
                for e, stream, abstract in zip(self.engines, streamed, shapes)
            ]
            for e, stream in zip(self.engines, streamed):
                if stream:
                    e.rt.load_serving(ckpt.stream_module(directory, e.name, e.cfg))
            source = f"checkpoint {directory}"
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(states))
        compacted = False
        for e, state, stream in zip(self.engines, states, streamed):
            if not stream:
                e.rt.state = state
                compacted |= e.rt.compact()  # one copy of the weights while serving, as at start
        if compacted:
            from pathways import cpu

            cpu.release_free_memory()
        log.info("module %s: now serving the weights of %s", self.engine.name, source)
        return module_pb2.PublishResponse(parameters=n)

    def _steps(self, steps, b: int) -> np.ndarray:
        if not self.engine.kind.is_head:
            return np.zeros(b, np.int32)
        return _rows(steps, "steps", b, 0)

    def _encode(self, resp, out, logits, dtype):
        """Fills resp's output (and logits) in place and returns resp."""
        self._tensor(out, dtype, resp.output)
        if logits is not None:
            codec.encode(logits, "float32", out=resp.logits)
        return resp

    def _tensor(self, a, dtype, out=None):
        a = np.asarray(a)
        if a.dtype.kind in "iu" or dtype == codec.DType.DTYPE_UNSPECIFIED:
            return codec.encode(a, out=out)
        return codec.encode(a, dtype, out=out)
