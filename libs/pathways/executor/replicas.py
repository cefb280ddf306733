"""Where each module's replicas are, and the connections to them: the `ReplicaSource` interface
the remote executor asks for a module's current "host:port" addresses, its fixed-address
implementation, and `ReplicaSet`, the pool of channels that hands out the least loaded replica.

Kubernetes discovery (`pathways.k8s.discovery.EndpointsWatcher`) implements the same interface;
this module stays free of the Kubernetes client so the executor does not depend on it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Protocol

import grpc

from pathways import telemetry, transport
from pathways.v1 import module_pb2_grpc

Callback = Callable[[str, list[str]], None]  # (module, its ready "host:port" replicas)


class ReplicaSource(Protocol):
    """Where a module's replicas are: `replicas(module)` now, `subscribe(cb)` for every change.

    `replicas` is called on every new session, so it must be cheap and thread-safe.
    """

    def replicas(self, module: str) -> list[str]: ...

    def subscribe(self, callback: Callback) -> None: ...


class StaticReplicaSource:
    """Fixed addresses (the gateway's `--module NAME=HOST:PORT[,...]` flags, tests)."""

    def __init__(self, addresses: dict[str, list[str]]):
        self._addresses = {m: list(a) for m, a in addresses.items()}

    def replicas(self, module: str) -> list[str]:
        return list(self._addresses.get(module, []))

    def subscribe(self, callback: Callback) -> None:
        pass  # never changes


class HostedSource:
    """A source whose servers may host several modules each (`groups`: each group's modules,
    hosted by one server listed under "a+b"): a hosted module's replicas are its server's."""

    def __init__(self, source: ReplicaSource, groups):
        self.source = source
        self.server = {m: "+".join(g) for g in groups for m in g}
        self._members = {"+".join(g): list(g) for g in groups}

    def replicas(self, module: str) -> list[str]:
        return self.source.replicas(self.server.get(module, module))

    def subscribe(self, callback: Callback) -> None:
        def relay(name: str, addresses: list[str]) -> None:
            callback(name, addresses)
            for m in self._members.get(name, ()):
                callback(m, addresses)

        self.source.subscribe(relay)


class RemoteError(Exception):
    """A module call failed; `code` is the gRPC status (pass it on), the message names the module,
    `retry_after_s` is the module server's hint with RESOURCE_EXHAUSTED (None: it gave none)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code, self.retry_after_s = code, retry_after_s


class Replica:
    def __init__(self, module: str, address: str, options, tls=None):
        self.module, self.address = module, address
        self.channel = telemetry.channel(transport.channel(address, options, tls))
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

    def __init__(
        self,
        module: str,
        source: ReplicaSource,
        options,
        cooldown_s: float = 2.0,
        tls: transport.TLSConfig | None = None,  # None: this process's (transport.default())
    ):
        self.tls = tls
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
                r = self._held[a] = Replica(self.module, a, self.options, self.tls)
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


def replica_error(module: str, r: Replica | None, e: grpc.RpcError | None) -> RemoteError:
    where = f"module {module!r}" + (f" at {r.address}" if r is not None else "")
    if e is None:
        return RemoteError(grpc.StatusCode.UNAVAILABLE, f"{where}: no replica available")
    trailing = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    return RemoteError(e.code(), f"{where}: {e.details()}", transport.retry_after(trailing))
