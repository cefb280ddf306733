"""Pod building blocks shared by the rendered workloads: hardened security contexts, gRPC health
probes, volumes for the checkpoint, the spec, training output, the gateway's state and a writable
/tmp."""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import urlparse

GRPC_PORT = 50051
# Kubelet's gRPC probes cannot speak TLS: module servers and the gateway answer grpc.health.v1
# (and nothing else) in plaintext on this second port (`--health-port`).
HEALTH_PORT = 50052
# Prometheus: module servers and the gateway serve GET /metrics in plaintext on this side port
# (`--metrics-port`); the HTTP front serves it on its own port. Pods carry the usual
# prometheus.io/* annotations (SCRAPE), and the network policies admit scrapes from pods labelled
# SCRAPER_LABELS in any namespace.
METRICS_PORT = 9464
HTTP_PORT = 8000
SCRAPER_LABELS = {"app.kubernetes.io/name": "prometheus"}
# Each workload's certificate: a Secret with cert-manager's keys (tls.crt, tls.key, ca.crt), e.g.
# made by a cert-manager Certificate of that name, or `pathways certs` + kubectl create secret.
TLS_DIR = "/var/run/pathways/tls"
TLS_SECRETS = {
    "module": "pathways-module-tls",
    "gateway": "pathways-gateway-tls",
    "coordinator": "pathways-coordinator-tls",
    # Only its CA is used: it dials the gateway's Service, whose certificate must name it.
    "http-front": "pathways-http-front-tls",
}
# The name module servers' certificates are checked against (clients dial pod IPs found by
# discovery, which no certificate holds): module certificates need it as a DNS name.
TLS_SERVER_NAME = "pathways-module"
API_KEYS_DIR = "/var/run/pathways/api-keys"
API_KEYS_SECRET = "pathways-api-keys"  # key keys.json: hashed keys (pathways.serving.auth)
# On SIGTERM the module server flips health to NOT_SERVING and stops with server.stop(grace_s),
# letting in-flight calls finish; the pod gets `--grace-s SHUTDOWN_GRACE_S` and Kubernetes waits that
# long plus EXIT_MARGIN_S (process exit, telemetry flush) before SIGKILL.
SHUTDOWN_GRACE_S = 30
# The gateway's calls in flight are whole generations (a stream of tokens), so its drain is
# longer: `--grace-s GATEWAY_GRACE_S`; it exits as soon as the last one ends.
GATEWAY_GRACE_S = 60
EXIT_MARGIN_S = 5
RUN_AS = 10001  # the non-root user the service images create

CHECKPOINT_DIR = "/checkpoint"
SPEC_DIR = "/etc/pathways"
SPEC_CONFIGMAP = "pathways-spec"  # a configMapGenerator: kustomize appends a content hash
DEFAULT_CHECKPOINT_URI = "pvc://pathways-checkpoints"
# Training output (checkpoints, metrics) is written by the coordinator and, when a job trains
# through the module services, by every module server (TrainingService.Save) into the same
# directory: one volume they all mount read-write. Its own volume, so the served checkpoint stays
# read-only.
TRAINING_DIR = "/training"
DEFAULT_TRAINING_URI = "pvc://pathways-training"
# The gateway's pathway table changes (AddModule, SetPathway, RemovePathway; its --pathways-file)
# are written here, a file per checkpoint URI, so a restarted or rescheduled gateway pod serves
# them again and a rollout to another checkpoint starts from that checkpoint's spec. One writer
# per file: a claim for a single gateway replica (ReadWriteOnce); several replicas would each
# write their own table over the others', so they get a volume per pod instead (k8s/README.md).
GATEWAY_STATE_DIR = "/var/lib/pathways"
DEFAULT_GATEWAY_STATE_URI = "pvc://pathways-gateway-state"


def pod_security(user: int = RUN_AS, group: int = RUN_AS) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": user,
        "runAsGroup": group,
        "fsGroup": group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def grpc_probes() -> dict[str, Any]:
    """Native gRPC probes against grpc.health.v1 (service "" = the whole server), on the
    plaintext health port.

    startup: allows 5 minutes for loading weights and compiling before liveness applies.
    readiness: NOT_SERVING (still warming up, or draining after SIGTERM) takes the pod out of its
    Service's endpoints, so discovery stops routing new sessions to it.
    liveness: a server that stops answering health checks for 30 s is restarted.
    """
    check = {"grpc": {"port": HEALTH_PORT, "service": ""}}
    return {
        "startupProbe": {**check, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 60},
        "readinessProbe": {**check, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2},
        "livenessProbe": {**check, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
    }


def _uri_volume(
    name: str, uri: str, path: str, read_only: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, volumeMount) for `pvc://CLAIM[/SUBPATH]` or `file:///PATH` mounted at `path`."""
    parsed = urlparse(uri)
    mount: dict[str, Any] = {"name": name, "mountPath": path}
    if read_only:
        mount["readOnly"] = True
    if parsed.scheme == "pvc" and parsed.netloc:
        sub = parsed.path.strip("/")
        if sub:
            mount["subPath"] = sub
        claim: dict[str, Any] = {"claimName": parsed.netloc}
        if read_only:
            claim["readOnly"] = True
        return {"name": name, "persistentVolumeClaim": claim}, mount
    if parsed.scheme == "file" and not parsed.netloc and parsed.path.startswith("/"):
        return {"name": name, "hostPath": {"path": parsed.path, "type": "Directory"}}, mount
    raise ValueError(f"{name} URI must be pvc://CLAIM[/SUBPATH] or file:///PATH, got {uri!r}")


def checkpoint_volume(uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, volumeMount) that put the checkpoint named by `uri` read-only at CHECKPOINT_DIR.

    `pvc://CLAIM[/SUBPATH]` mounts a PersistentVolumeClaim (ReadOnlyMany storage shared by all
    replicas); `file:///PATH` mounts a directory of the node (single-node dev clusters).
    """
    return _uri_volume("checkpoint", uri, CHECKPOINT_DIR, read_only=True)


def training_volume(uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, volumeMount) that put the training output volume read-write at TRAINING_DIR.

    `pvc://CLAIM[/SUBPATH]`: a claim every writer mounts at once (ReadWriteMany, or ReadWriteOnce
    on a single node); `file:///PATH`: a node directory writable by uid RUN_AS.
    """
    return _uri_volume("training", uri, TRAINING_DIR, read_only=False)


def gateway_state_volume(uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, volumeMount) that put the gateway's state volume read-write at GATEWAY_STATE_DIR:
    `pvc://CLAIM[/SUBPATH]` (ReadWriteOnce is enough for the one replica that writes it) or
    `file:///PATH`, a node directory writable by uid RUN_AS."""
    return _uri_volume("gateway-state", uri, GATEWAY_STATE_DIR, read_only=False)


def gateway_pathways_file(checkpoint_uri: str) -> str:
    """The gateway's --pathways-file for the checkpoint at `checkpoint_uri`: the checkpoint is
    always mounted at CHECKPOINT_DIR, so the file is named after the URI (a store applies its
    changes to whichever checkpoint the gateway serves)."""
    digest = hashlib.sha256(checkpoint_uri.encode()).hexdigest()[:12]
    return f"{GATEWAY_STATE_DIR}/pathways-{digest}.json"


def common_volumes(
    checkpoint_uri: str, training_uri: str | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts every Pathways container gets: checkpoint, spec, and /tmp (the root
    filesystem is read-only; JAX and gRPC still want a scratch directory); with `training_uri`,
    also the writable training volume (for the workloads that write training output)."""
    ckpt_volume, ckpt_mount = checkpoint_volume(checkpoint_uri)
    volumes = [
        ckpt_volume,
        {"name": "spec", "configMap": {"name": SPEC_CONFIGMAP}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    mounts = [
        ckpt_mount,
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if training_uri is not None:
        train_volume, train_mount = training_volume(training_uri)
        volumes.append(train_volume)
        mounts.append(train_mount)
    return volumes, mounts


def tls(component: str) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(volume, volumeMount, env) that give a workload its certificate (see TLS_SECRETS) and
    the settings pathways.transport reads."""
    volume = {
        "name": "tls",
        "secret": {"secretName": TLS_SECRETS[component], "defaultMode": 0o440},
    }
    mount = {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}
    env = [
        {"name": "PATHWAYS_TLS_DIR", "value": TLS_DIR},
        {"name": "PATHWAYS_TLS_SERVER_NAME", "value": TLS_SERVER_NAME},
    ]
    return volume, mount, env


def health_port() -> dict[str, Any]:
    return {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}


def metrics_port(port: int = METRICS_PORT) -> dict[str, Any]:
    return {"name": "metrics", "containerPort": port, "protocol": "TCP"}


def scrape(port: int = METRICS_PORT) -> dict[str, str]:
    """Pod annotations that point Prometheus' kubernetes_sd (annotation-based configs) at
    /metrics on `port`."""
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }


def namespace_env() -> dict[str, Any]:
    return {
        "name": "PATHWAYS_NAMESPACE",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    }


def spread(selector: dict[str, str]) -> list[dict[str, Any]]:
    """Spread replicas across nodes when possible (never blocks scheduling)."""
    return [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector},
        }
    ]


def deployment(
    meta: dict[str, Any],
    selector: dict[str, str],
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    *,
    grace_s: int,
    account: str | None = None,
    pod_annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Deployment of one container, rolled surge-first (a new pod is Ready before an old one
    drains). No spec.replicas: `kubectl scale` and the HPA own the count, and re-applying must
    not reset it. Pods without a service `account` get no API token (they never call the API)."""
    pod: dict[str, Any] = (
        {"automountServiceAccountToken": False}
        if account is None
        else {"serviceAccountName": account}
    )
    pod.update(
        {
            "terminationGracePeriodSeconds": grace_s,
            "securityContext": pod_security(),
            "topologySpreadConstraints": spread(selector),
            "containers": [container],
            "volumes": volumes,
        }
    )
    template_meta: dict[str, Any] = {"labels": meta["labels"]}
    if pod_annotations:
        template_meta["annotations"] = pod_annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": selector},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {"metadata": template_meta, "spec": pod},
        },
    }
