"""Module sessions that outlive their replica: opened on the least loaded replica, and moved when
it is going away (`GONE`) or forgets the session (NOT_FOUND after a restart or TTL) to another one
by replaying the exact calls the session made to that module, so the cache and the generated
text come out identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import grpc

from pathways.executor.decode_stream import DecodeStream
from pathways.executor.replicas import RemoteError, Replica, ReplicaSet, replica_error
from pathways.v1 import module_pb2

# The replica is going away: it failed, refuses calls while it shuts down (UNAVAILABLE), or
# cancelled the call before running it. A server that has begun shutting down cancels a call
# that reaches it on an open connection before its GOAWAY has reached the client (gRPC core
# answers RST_STREAM: the client sees CANCELLED "CANCELLED"; measured on grpcio 1.85, and seen
# in a Kubernetes scale-down). A call this process cancels itself is CANCELLED too: callers
# move on CANCELLED only while their session is still open (see RemoteExecutor._call).
GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
MOVE = (*GONE, grpc.StatusCode.NOT_FOUND)


@dataclasses.dataclass
class ModuleSession:
    replica: Replica
    session_id: str
    open_request: module_pb2.OpenSessionRequest
    replay: list | None  # (method, request) calls made, kept for stateful (attention) modules
    stream: DecodeStream | None = None

    def drop_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def open_on(
    rset: ReplicaSet,
    module: str,
    req,
    replay,
    timeout: Callable[[], float],
    exclude: tuple[Replica, ...] = (),
) -> ModuleSession:
    """Opens a module session on the least loaded replica that answers; `timeout()` gives each
    call's deadline (it raises when the caller's has passed)."""
    tried, last = list(exclude), None
    for _ in range(rset.size() + 1):
        r = rset.acquire(tuple(tried))
        if r is None:
            break
        try:
            resp = r.stub.OpenSession(req, timeout=timeout())
        except grpc.RpcError as e:
            rset.release(r)
            last = e
            if e.code() in GONE or e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                if e.code() in GONE:
                    rset.mark_down(r)
                tried.append(r)
                if rset.tried_all(tried):
                    break
                continue
            raise replica_error(module, r, e) from None
        return ModuleSession(r, resp.session_id, req, replay)
    raise replica_error(module, None, last)


def move(
    rset: ReplicaSet,
    module: str,
    ms: ModuleSession,
    failed: bool,
    max_attempts: int,
    timeout: Callable[[], float],
) -> None:
    """Re-creates a module session on another replica by replaying its calls."""
    old = ms.replica
    if failed:
        rset.mark_down(old)
    for _ in range(max_attempts):
        new = open_on(
            rset, module, ms.open_request, ms.replay, timeout, exclude=(old,) if failed else ()
        )
        rset.release(old)  # ms always holds exactly one replica, also when open_on raises
        ms.replica, ms.session_id = new.replica, new.session_id
        try:
            for method, req in ms.replay or ():
                req.session_id = ms.session_id
                getattr(ms.replica.stub, method)(req, timeout=timeout())
            return
        except grpc.RpcError as e:
            if e.code() not in MOVE:
                raise replica_error(module, ms.replica, e) from None
            rset.mark_down(ms.replica)
            old = ms.replica
    raise RemoteError(
        grpc.StatusCode.UNAVAILABLE,
        f"module {module!r}: no replica could take over the session",
    )
