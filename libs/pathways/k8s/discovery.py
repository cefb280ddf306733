"""Live module replica addresses for the gateway: a `ReplicaSource` fed by a watch on the Endpoints
of each module's headless Service (core/v1 Endpoints: served by every Kubernetes version)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

from kubernetes import client, config, watch

# The interface lives with the executor that consumes it (no Kubernetes client there); re-exported.
from pathways.executor.replicas import (  # noqa: F401
    Callback,
    ReplicaSource,
    StaticReplicaSource,
)
from pathways.k8s import names

log = logging.getLogger(__name__)
_SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def ready_addresses(endpoints: Any, port_name: str = "grpc") -> list[str]:
    """Sorted "ip:port" of the ready addresses of a V1Endpoints on its port named `port_name`."""
    out = set()
    for subset in endpoints.subsets or []:
        ports = [p.port for p in subset.ports or [] if p.name == port_name]
        for port in ports:
            out.update(f"{a.ip}:{port}" for a in subset.addresses or [])
    return sorted(out)


class EndpointsWatcher:
    """Watches the Endpoints of each module's Service in one namespace (a background thread).

    Endpoints list only pods whose readiness probe passes, so a replica joins once it reports
    SERVING and leaves as soon as it starts draining (SIGTERM) or is deleted by `kubectl scale`.
    Needs get/list/watch on endpoints in the namespace (the rendered `pathways-discovery` Role).
    """

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        modules: Iterable[str],
        watch_timeout_s: int = 300,
    ):
        self._core = client.CoreV1Api(api)
        self._namespace = namespace
        self._services = {names.dns_name(m): m for m in modules}  # Service name -> module
        self._timeout = watch_timeout_s
        self._lock = threading.Lock()
        self._replicas: dict[str, list[str]] = {m: [] for m in self._services.values()}
        self._callbacks: list[Callback] = []
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name="endpoints-watch", daemon=True)

    # ReplicaSource
    def replicas(self, module: str) -> list[str]:
        with self._lock:
            return list(self._replicas.get(module, []))

    def subscribe(self, callback: Callback) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def snapshot(self) -> dict[str, list[str]]:
        with self._lock:
            return {m: list(r) for m, r in self._replicas.items()}

    def start(self, wait_s: float = 10.0) -> EndpointsWatcher:
        """Starts watching; returns once the first list is in (or after `wait_s`)."""
        self._thread.start()
        self._synced.wait(wait_s)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        self._thread.join(timeout=5)

    def _update(self, service: str, addresses: list[str]) -> None:
        module = self._services.get(service)
        if module is None:
            return
        with self._lock:
            if self._replicas.get(module) == addresses:
                return
            self._replicas[module] = addresses
            callbacks = list(self._callbacks)
        log.info("module %s replicas: %s", module, ", ".join(addresses) or "none")
        for cb in callbacks:
            try:
                cb(module, list(addresses))
            except Exception:  # one bad subscriber must not stop discovery for the rest
                log.exception("replica callback failed for module %s", module)

    def _run(self) -> None:
        resource_version = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    listed = self._core.list_namespaced_endpoints(
                        self._namespace, _request_timeout=30
                    )
                    seen = {e.metadata.name for e in listed.items}
                    for e in listed.items:
                        self._update(e.metadata.name, ready_addresses(e))
                    for service in self._services.keys() - seen:
                        self._update(service, [])
                    resource_version = listed.metadata.resource_version
                    self._synced.set()
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    self._core.list_namespaced_endpoints,
                    self._namespace,
                    resource_version=resource_version,
                    timeout_seconds=self._timeout,
                ):
                    obj = event["object"]
                    resource_version = obj.metadata.resource_version
                    gone = event["type"] == "DELETED"
                    self._update(obj.metadata.name, [] if gone else ready_addresses(obj))
            except client.ApiException as e:
                if e.status == 410:  # history compacted: list again
                    resource_version = None
                    continue
                log.warning("endpoints watch failed: %s %s; retrying", e.status, e.reason)
                self._stop.wait(1.0)
            except Exception as e:  # connection drops: retry without losing the cache
                if self._stop.is_set():
                    return
                log.warning("endpoints watch interrupted: %s; retrying", e)
                resource_version = None
                self._stop.wait(1.0)


def in_cluster(modules: Iterable[str], namespace: str | None = None) -> EndpointsWatcher:
    """A started watcher for a pod running under the `pathways-discovery` ServiceAccount.

    The namespace defaults to $PATHWAYS_NAMESPACE (set by the rendered manifests through the
    downward API), else the pod's own ServiceAccount namespace.
    """
    config.load_incluster_config()
    if namespace is None:
        namespace = os.environ.get("PATHWAYS_NAMESPACE")
    if namespace is None:
        with open(_SA_NAMESPACE) as f:
            namespace = f.read().strip()
    return EndpointsWatcher(client.ApiClient(), namespace, modules).start()


def from_kubeconfig(
    modules: Iterable[str], namespace: str, kubeconfig: str | None = None
) -> EndpointsWatcher:
    """A started watcher with a kubeconfig's credentials (a gateway outside the cluster, tests);
    `kubeconfig` defaults to $KUBECONFIG, else ~/.kube/config."""
    api = config.new_client_from_config(config_file=kubeconfig)
    return EndpointsWatcher(api, namespace, modules).start()
