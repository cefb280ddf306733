"""A session's decode steps to one module replica as one bidirectional gRPC stream; the steps
that lockstep lines up at a replica sent on one of them as one message."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

import grpc

from pathways.executor.lockstep import Entry, Lockstep
from pathways.v1 import module_pb2


class DecodeStream:
    """Sends DecodeRequests one at a time and returns each response (the server answers in order).

    A stream has one deadline for its whole life: `deadline` (absolute, time.monotonic) — the
    caller's if it has one, else a renewal horizon after which a fresh stream is opened.
    """

    def __init__(self, stub, deadline: float):
        self.deadline = deadline
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        timeout = max(0.001, deadline - time.monotonic())
        self._responses = stub.DecodeStream(iter(self._q.get, None), timeout=timeout)

    def step(self, req: module_pb2.DecodeRequest) -> module_pb2.DecodeResponse:
        self._q.put(module_pb2.DecodeStreamRequest(step=req))
        return next(self._responses).step

    def group(self, reqs: list[module_pb2.DecodeRequest]) -> list[module_pb2.GroupStepResult]:
        """Several sessions' steps as one message (see DecodeStreamRequest.group)."""
        self._q.put(module_pb2.DecodeStreamRequest(group=reqs))
        return list(next(self._responses).group)

    def close(self) -> None:
        self._q.put(None)
        self._responses.cancel()


def session_stream(
    ms, deadline: float | None, horizon_s: float, renew_s: float, check: Callable[[], object]
) -> DecodeStream:
    """The module session's (`failover.ModuleSession`) stream, opened or renewed as needed: it
    ends at the caller's `deadline`, or without one `horizon_s` ahead, renewed once fewer than
    `renew_s` are left so the horizon never cuts a step short. `check()` raises when the
    caller's deadline has passed."""
    dl = deadline
    now = time.monotonic()
    if dl is None:
        dl = now + horizon_s
        if ms.stream is not None and ms.stream.deadline - now < renew_s:
            ms.drop_stream()  # renew before the horizon cuts a step short
    elif ms.stream is not None and ms.stream.deadline != dl:
        ms.drop_stream()
    if ms.stream is None:
        check()  # raises when the caller's deadline has passed
        ms.stream = DecodeStream(ms.replica.stub, dl)
    return ms.stream


def send_group(lockstep: Lockstep, module: str, group: list[Entry], stream_of) -> None:
    """Sends the group's decode steps (lockstep `Entry`s of (session id, module session, request,
    chain)) as one message on the first entry's stream (`stream_of(ms)`); hands every entry its
    response, or None (it failed here: its session re-sends it alone)."""
    results: list = [None] * len(group)
    sender = group[0].item[1]
    try:
        reqs = []
        for e in group:
            _, ms, req, _ = e.item
            req.session_id = ms.session_id
            reqs.append(req)
        out = stream_of(sender).group(reqs)
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
                lockstep.done(session_id, chain)
        lockstep.hand_over(module, list(zip(group, results)))
