"""Where each module's replicas are: the `ReplicaSource` interface the remote executor asks for a
module's current "host:port" addresses, and its fixed-address implementation.

Kubernetes discovery (`pathways.k8s.discovery.EndpointsWatcher`) implements the same interface;
this module stays free of the Kubernetes client so the executor does not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

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
