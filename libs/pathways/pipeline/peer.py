"""Direct stage-to-stage training steps: the server side of TrainingService.RunStep and Deliver.

The caller starts RunStep on every stage of a pipeline at once. Each stage runs its schedule's ops
(`pipeline.schedule.stage_ops`); a forward's output goes straight to the next stage's server and
a backward's input gradient straight to the previous one, each over one client stream per step
(Deliver). The caller only hands the inputs to the first stage and the targets to the last, and
collects the losses: every activation crosses the wire once, module to module, instead of twice
through the caller.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np

from pathways import codec, transport
from pathways.pipeline.schedule import SCHEDULES, stage_ops
from pathways.pipeline.stage import LocalStage
from pathways.serving.errors import DeadlineExceeded, InvalidArgument, ServingError
from pathways.serving.limits import LimitExceeded, check_count
from pathways.v1 import training_pb2, training_pb2_grpc

_POLL_S = 0.5  # how often a waiting step checks that its caller is still there


class Aborted(ServingError):
    code = grpc.StatusCode.ABORTED


class PeerUnavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class Inbox:
    """Tensors delivered for RunStep steps, keyed (step, gradient, micro-batch).

    A delivery may come before the step starts here (the neighbour is ahead); a taker waits for
    it. `abort()` wakes every taker with Aborted (Reset after a failed step elsewhere). What it
    holds is bounded: at most `max_bytes` of tensors and `max_items` deliveries (a step's
    activations and gradients, a few steps ahead); past that a delivery is refused
    (RESOURCE_EXHAUSTED naming max_inbox_mb).
    """

    def __init__(self, max_bytes: int | None = None, max_items: int | None = None):
        self._cv = threading.Condition()
        self._items: dict[tuple[int, bool, int], np.ndarray | None] = {}
        self._generation = 0
        self._reason = ""
        self.max_bytes, self.max_items = max_bytes, max_items
        self.bytes = 0

    def put(self, step: int, gradient: bool, mb: int, value) -> None:
        n = 0 if value is None else int(value.nbytes)
        with self._cv:
            key = (step, gradient, mb)
            old = self._items.get(key)
            held = self.bytes - (0 if old is None else int(old.nbytes))
            if self.max_bytes is not None and held + n > self.max_bytes:
                raise LimitExceeded(
                    f"the inbox of deliveries holds {held} bytes; {n} more would exceed "
                    f"max_inbox_mb = {self.max_bytes / 2**20:g} (--max-inbox-mb)"
                )
            if self.max_items is not None and key not in self._items:
                if len(self._items) >= self.max_items:
                    raise LimitExceeded(
                        f"the inbox of deliveries holds {len(self._items)} tensors, its limit "
                        f"(4 x max_micro_batches); deliveries for steps nobody runs are refused"
                    )
            self._items[key] = value
            self.bytes = held + n
            self._cv.notify_all()

    def _pop(self, key):
        value = self._items.pop(key)
        if value is not None:
            self.bytes -= int(value.nbytes)
        return value

    def take(self, step: int, gradient: bool, mb: int, deadline: float | None, alive=None):
        """Waits for a delivery; `alive()` false (the caller went away) aborts the wait."""
        key = (step, gradient, mb)
        what = "gradient" if gradient else "activation"
        with self._cv:
            generation = self._generation
            while key not in self._items:
                if self._generation != generation:
                    raise Aborted(f"step aborted while waiting for the {what} of micro-batch {mb}")
                if alive is not None and not alive():
                    raise Aborted(f"the caller of the step went away (waiting for the {what})")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DeadlineExceeded(
                        f"deadline exceeded waiting for the {what} of micro-batch {mb}"
                    )
                self._cv.wait(_POLL_S if left is None else min(left, _POLL_S))
            return self._pop(key)

    def keep_only(self, step: int) -> None:
        """Drops deliveries of other steps (left over from a step that failed elsewhere)."""
        with self._cv:
            for key in [k for k in self._items if k[0] != step]:
                self._pop(key)

    def abort(self) -> None:
        with self._cv:
            self._generation += 1
            self._items.clear()
            self.bytes = 0
            self._cv.notify_all()


class _Sender:
    """One Deliver stream to a neighbour for one step; `send` never blocks on the network."""

    def __init__(self, stub, address: str, timeout: float | None):
        self.address, self.bytes = address, 0
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._call = stub.Deliver.future(iter(self._q.get, None), timeout=timeout)

    def send(self, req: training_pb2.DeliverRequest) -> None:
        if self._call.done():  # the stream already failed: say so now, not at the end
            self.finish()
        self.bytes += req.ByteSize()
        self._q.put(req)

    def finish(self) -> None:
        self._q.put(None)
        try:
            self._call.result()
        except grpc.RpcError as e:
            raise PeerUnavailable(
                f"sending to the neighbouring stage at {self.address} failed: "
                f"{e.code().name}: {e.details()}"
            ) from None

    def cancel(self) -> None:
        self._q.put(None)
        self._call.cancel()


class Peers:
    """Channels to neighbouring stages' servers, one per address, kept across steps."""

    def __init__(self, options, tls=None):
        self._options, self._stubs, self._lock = options, {}, threading.Lock()
        self._tls = tls  # None: this process's (transport.default())

    def sender(self, address: str, timeout: float | None) -> _Sender:
        with self._lock:
            if address not in self._stubs:
                channel = transport.channel(address, self._options, self._tls)
                self._stubs[address] = training_pb2_grpc.TrainingServiceStub(channel)
            stub = self._stubs[address]
        return _Sender(stub, address, timeout)


def check_request(req: training_pb2.RunStepRequest, max_micro_batches: int | None = None) -> None:
    """Bad plans get INVALID_ARGUMENT naming the field, before anything runs (and before anything
    sized by micro_batches is allocated)."""
    if req.schedule not in SCHEDULES:
        raise InvalidArgument(
            f"schedule must be one of {', '.join(SCHEDULES)}; got {req.schedule!r}"
        )
    if req.micro_batches < 1:
        raise InvalidArgument(f"micro_batches must be >= 1; got {req.micro_batches}")
    if max_micro_batches is not None:
        check_count(req.micro_batches, max_micro_batches, "micro_batches", "max_micro_batches")
    if req.stages < 1 or not 0 <= req.stage < req.stages:
        raise InvalidArgument(f"stage {req.stage} is outside [0, stages = {req.stages})")
    first, last = req.stage == 0, req.stage == req.stages - 1
    if first and len(req.inputs) != req.micro_batches:
        raise InvalidArgument(
            f"inputs has {len(req.inputs)} tensors for {req.micro_batches} micro-batches "
            f"(the first stage needs one per micro-batch)"
        )
    if not first and len(req.inputs):
        raise InvalidArgument("inputs are only for the first stage")
    if last and len(req.targets) != req.micro_batches:
        raise InvalidArgument(
            f"targets has {len(req.targets)} tensors for {req.micro_batches} micro-batches "
            f"(the last stage needs one per micro-batch)"
        )
    if not last and not req.next:
        raise InvalidArgument(f"next (address of stage {req.stage + 1}) is required")
    if not first and not req.previous:
        raise InvalidArgument(f"previous (address of stage {req.stage - 1}) is required")


def run_step(
    req: training_pb2.RunStepRequest,
    stage: LocalStage,
    inbox: Inbox,
    peers: Peers,
    check_input,
    check_targets,
    deadline: float | None,
    alive=None,
    max_micro_batches: int | None = None,
) -> training_pb2.RunStepResponse:
    """Runs this stage's ops of step `req.step`; sends outputs and input gradients onwards."""
    check_request(req, max_micro_batches)
    k, i, n = req.stages, req.stage, req.micro_batches
    first, last = i == 0, i == k - 1
    inputs = [check_input(codec.decode(t, f"inputs[{m}]"), m) for m, t in enumerate(req.inputs)]
    targets = [check_targets(t, m) for m, t in enumerate(req.targets)]
    inbox.keep_only(req.step)
    timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
    to_next = None if last else peers.sender(req.next, timeout)
    to_prev = None if first else peers.sender(req.previous, timeout)
    losses, busy = [0.0] * n, 0.0
    try:
        for op, m in stage_ops(req.schedule, i, k, n):
            if op == "F":
                x = (
                    inputs[m]
                    if first
                    else check_input(inbox.take(req.step, False, m, deadline, alive), m)
                )
                t0 = time.perf_counter()
                y = stage.forward(m, x, targets[m] if last else None)
                if last:
                    losses[m] = float(y)
                    busy += time.perf_counter() - t0
                    continue
                msg = training_pb2.DeliverRequest(step=req.step, micro_batch=m)
                codec.encode(np.asarray(y), out=msg.tensor)
                busy += time.perf_counter() - t0
                to_next.send(msg)
            else:
                g = np.float32(1.0 / n) if last else inbox.take(req.step, True, m, deadline, alive)
                if not last and g is not None and g.dtype != np.float32:
                    raise InvalidArgument(
                        f"gradient of micro-batch {m} must be float32; got {g.dtype} "
                        f"{list(g.shape)}"
                    )
                t0 = time.perf_counter()
                try:
                    g_x = stage.backward(m, g)
                except (TypeError, ValueError) as e:  # a gradient of the wrong shape
                    raise InvalidArgument(f"gradient of micro-batch {m}: {e}") from None
                msg = training_pb2.DeliverRequest(step=req.step, micro_batch=m, gradient=True)
                if g_x is not None:
                    codec.encode(np.asarray(g_x), out=msg.tensor)
                busy += time.perf_counter() - t0
                if to_prev is not None:
                    to_prev.send(msg)
        sent = 0
        for s in (to_next, to_prev):
            if s is not None:
                s.finish()
                sent += s.bytes
    except BaseException:
        for s in (to_next, to_prev):
            if s is not None:
                s.cancel()
        stage.reset()
        raise
    return training_pb2.RunStepResponse(
        losses=losses if last else [], busy_seconds=busy, sent_bytes=sent
    )


def deliver(request_iterator, inbox: Inbox, decode=codec.decode) -> training_pb2.DeliverResponse:
    """Puts each delivered tensor in `inbox`; `decode(tensor, field)` (the server's: bounded in
    elements) turns it into an array."""
    for req in request_iterator:
        value = None
        if req.HasField("tensor"):
            field = "gradient" if req.gradient else "activation"
            value = decode(req.tensor, f"{field} of micro-batch {req.micro_batch}")
        inbox.put(req.step, req.gradient, req.micro_batch, value)
    return training_pb2.DeliverResponse()
