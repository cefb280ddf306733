"""Operator actions on a running pathway through the Kubernetes API: scale one module, report
desired/ready replicas per module. Failures raise `ClusterError` with a one-line message."""

from __future__ import annotations

import dataclasses

import urllib3  # pants: no-infer-dep (a dependency of `kubernetes`, imported below)
from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from pathways.k8s import names

MODULE_SELECTOR = f"{names.APP_LABEL}={names.APP},{names.COMPONENT_LABEL}=module"
TIMEOUT_S = 10


class ClusterError(Exception):
    """The cluster refused or could not be reached; the message is one line for the operator."""


@dataclasses.dataclass(frozen=True)
class ModuleStatus:
    module: str  # the spec's name
    deployment: str
    desired: int
    ready: int
    updated: int


def connect(kubeconfig: str | None = None) -> tuple[client.ApiClient, str | None]:
    """An API client from `kubeconfig` (default: $KUBECONFIG or ~/.kube/config, else in-cluster)
    and the namespace of its current context (None when it names none)."""
    try:
        config.load_kube_config(config_file=kubeconfig)
        _, context = config.list_kube_config_contexts(config_file=kubeconfig)
        namespace = (context or {}).get("context", {}).get("namespace")
    except (ConfigException, OSError) as e:
        if kubeconfig:
            raise ClusterError(f"cannot load kubeconfig {kubeconfig}: {e}") from None
        try:
            config.load_incluster_config()
        except ConfigException:
            raise ClusterError(f"no usable kubeconfig ({e}); set KUBECONFIG") from None
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            namespace = f.read().strip()
    cfg = client.Configuration.get_default_copy()
    cfg.retries = 1  # an unreachable cluster should fail in seconds, not after urllib3's retries
    if not cfg.verify_ssl:  # the kubeconfig asked for insecure-skip-tls-verify; don't nag per call
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return client.ApiClient(cfg), namespace


def _call(api: client.ApiClient, what: str, fn, *args, **kwargs):
    try:
        return fn(*args, _request_timeout=TIMEOUT_S, **kwargs)
    except client.ApiException as e:
        if e.status == 403:
            raise ClusterError(f"{what}: forbidden by RBAC ({e.reason})") from None
        if e.status == 401:
            raise ClusterError(
                f"{what}: unauthorized; check the kubeconfig's credentials"
            ) from None
        raise
    except urllib3.exceptions.HTTPError as e:
        reason = getattr(e, "reason", None) or e
        raise ClusterError(
            f"cannot reach the Kubernetes API at {api.configuration.host}: "
            f"{str(reason).split(': ')[-1]}"
        ) from None


def _check_namespace(api: client.ApiClient, namespace: str) -> None:
    try:
        _call(api, f"namespace {namespace}", client.CoreV1Api(api).read_namespace, namespace)
    except client.ApiException as e:
        if e.status == 404:
            raise ClusterError(f"namespace {namespace!r} not found") from None
        raise ClusterError(f"namespace {namespace}: {e.status} {e.reason}") from None


def status(api: client.ApiClient, namespace: str) -> list[ModuleStatus]:
    """Desired/ready/updated replicas of every module Deployment in `namespace`, by module name."""
    _check_namespace(api, namespace)
    deployments = _call(
        api,
        "list deployments",
        client.AppsV1Api(api).list_namespaced_deployment,
        namespace,
        label_selector=MODULE_SELECTOR,
    )
    rows = []
    for d in deployments.items:
        module = (d.metadata.annotations or {}).get(names.MODULE_NAME_ANNOTATION, d.metadata.name)
        rows.append(
            ModuleStatus(
                module=module,
                deployment=d.metadata.name,
                desired=d.spec.replicas or 0,
                ready=d.status.ready_replicas or 0,
                updated=d.status.updated_replicas or 0,
            )
        )
    return sorted(rows, key=lambda r: r.module)


def scale(api: client.ApiClient, namespace: str, module: str, replicas: int) -> int:
    """Sets `module`'s Deployment to `replicas` through the scale subresource (a co-located
    module's: its group's); returns the previous desired count."""
    if replicas < 0:
        raise ClusterError(f"--replicas must be >= 0, got {replicas}")
    apps = client.AppsV1Api(api)
    rows = status(api, namespace)
    by_name = {r.module: r for r in rows} | {r.deployment: r for r in rows}
    # a module co-located with others (`render(colocate=...)`, "attn-1+head"): its server's
    by_name |= {m: r for r in rows if "+" in r.module for m in r.module.split("+")}
    row = by_name.get(module) or by_name.get(names.dns_name(module))
    if row is None:
        known = ", ".join(r.module for r in rows) or "none"
        raise ClusterError(f"unknown module {module!r} in namespace {namespace!r}; known: {known}")
    try:
        _call(
            api,
            f"scale {row.deployment}",
            apps.patch_namespaced_deployment_scale,
            row.deployment,
            namespace,
            {"spec": {"replicas": replicas}},
        )
    except client.ApiException as e:
        raise ClusterError(f"scale {row.deployment}: {e.status} {e.reason}") from None
    return row.desired


def autoscaler_bounds(api: client.ApiClient, namespace: str, module: str) -> tuple[int, int] | None:
    """(min, max) replicas of the HorizontalPodAutoscaler that scales `module`, if there is one.

    Read through autoscaling/v1, which every Kubernetes version serves.
    """
    name = names.dns_name(module)
    hpa_api = client.AutoscalingV1Api(api)
    try:
        hpa = _call(
            api,
            f"read hpa {name}",
            hpa_api.read_namespaced_horizontal_pod_autoscaler,
            name,
            namespace,
        )
    except (client.ApiException, ClusterError):  # none, or not ours to read: nothing to say
        return None
    return hpa.spec.min_replicas or 1, hpa.spec.max_replicas
