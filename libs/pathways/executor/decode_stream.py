"""A session's decode steps to one module replica as one bidirectional gRPC stream."""

from __future__ import annotations

import queue
import time

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
