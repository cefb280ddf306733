"""Kubernetes objects for one pathway module: Deployment, headless Service, HPA and PDB."""

from __future__ import annotations

from typing import Any

from pathways.k8s import names, pods
from pathways.modules.kind import Kind
from pathways.placement import ModulePlacement

# Starting points; overlays patch them for real model sizes. Modules that keep a per-session
# cache (attention's KV cache) hold it per replica and do most of the work per token.
RESOURCES_WITH_CACHE = {
    "requests": {"cpu": "500m", "memory": "1Gi"},
    "limits": {"cpu": "2", "memory": "2Gi"},
}
RESOURCES_WITHOUT_CACHE = {
    "requests": {"cpu": "250m", "memory": "512Mi"},
    "limits": {"cpu": "1", "memory": "1Gi"},
}
HPA_MIN, HPA_MAX, HPA_CPU_PERCENT = 1, 4, 70


def module_objects(
    module: str,
    kind: Kind,
    image: str,
    checkpoint_uri: str,
    training_uri: str = pods.DEFAULT_TRAINING_URI,
    placement: ModulePlacement | None = None,
) -> list[dict[str, Any]]:
    """The objects that run and expose `module` (the spec's name) of `kind`; the server mounts
    the training volume, where it saves its part of a checkpoint when a job trains through it.
    `placement` (the spec's entry for the module): accelerators, nodes, resources, image.

    `module` may name consecutive modules that one server hosts and steps as one program
    ("attn-0,attn-1"; `kind`: the chain's, a cache when any module keeps one): its objects are
    named after the group ("attn-0+attn-1" -> attn-0-attn-1), and it only serves (training
    goes through servers of one module each)."""
    server = module.replace(",", "+")
    name = names.dns_name(server)
    labels = names.labels("module", server)
    selector = {names.APP_LABEL: names.APP, names.MODULE_LABEL: name}
    meta = {"name": name, "labels": labels, "annotations": {names.MODULE_NAME_ANNOTATION: server}}
    return [
        _placed(
            _deployment(meta, selector, module, kind, image, checkpoint_uri, training_uri),
            placement,
        ),
        _service(meta, selector),
        _hpa(meta),
        _pdb(meta, selector),
    ]


def _deployment(
    meta, selector, module, kind, image, checkpoint_uri, training_uri
) -> dict[str, Any]:
    volumes, mounts = pods.common_volumes(checkpoint_uri, training_uri)
    tls_volume, tls_mount, tls_env = pods.tls("module")
    volumes, mounts = [*volumes, tls_volume], [*mounts, tls_mount]
    container = {
        "name": "module-server",
        "image": image,
        "args": [
            "--checkpoint",
            pods.CHECKPOINT_DIR,
            "--module",
            module,
            "--host",
            "0.0.0.0",
            "--port",
            str(pods.GRPC_PORT),
            "--grace-s",
            str(pods.SHUTDOWN_GRACE_S),
            "--health-port",
            str(pods.HEALTH_PORT),
            "--metrics-port",
            str(pods.METRICS_PORT),
        ],
        "ports": [
            {"name": "grpc", "containerPort": pods.GRPC_PORT, "protocol": "TCP"},
            pods.health_port(),
            pods.metrics_port(),
        ],
        # XLA would size its thread pool by the node's CPUs, not the pod's limit: as many compute
        # threads as the limit allows (rounded up), no more.
        "env": [
            {
                "name": "PATHWAYS_CPU_THREADS",
                "valueFrom": {
                    "resourceFieldRef": {
                        "containerName": "module-server",
                        "resource": "limits.cpu",
                        "divisor": "1",
                    }
                },
            },
            *tls_env,  # mutual TLS: its certificate, and the name peers' are checked against
            # TrainingService.Save/Load write and read training runs there, nowhere else.
            {"name": "PATHWAYS_PATH_ROOTS", "value": pods.TRAINING_DIR},
            # Jobs train through module servers (TrainingService on a copy of the weights, for
            # the coordinator's and other module servers' certificates); what they learn is
            # served after an admin's `pathways publish`. A server of several modules only serves.
            *([] if "," in module else [{"name": "PATHWAYS_TRAINING", "value": "1"}]),
        ],
        "resources": RESOURCES_WITH_CACHE if kind.has_cache else RESOURCES_WITHOUT_CACHE,
        **pods.grpc_probes(),
        "securityContext": pods.container_security(),
        "volumeMounts": mounts,
    }
    return pods.deployment(
        meta,
        selector,
        container,
        volumes,
        grace_s=pods.SHUTDOWN_GRACE_S + pods.EXIT_MARGIN_S,
        pod_annotations={"pathways.dev/checkpoint": checkpoint_uri, **pods.scrape()},
    )


def _placed(deployment: dict[str, Any], placement: ModulePlacement | None) -> dict[str, Any]:
    """The module's Deployment where its placement says: accelerators as extended resources
    (whole devices: limits only, which Kubernetes copies to requests), a tensor-parallel mesh
    over them when there are several (PATHWAYS_MESH), node selector, tolerations, CPU and memory
    (request = limit), and the image built for the device."""
    if placement is None:
        return deployment
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    resources = {k: dict(v) for k, v in container["resources"].items()}
    for field in ("cpu", "memory"):
        if getattr(placement, field):
            resources["requests"][field] = resources["limits"][field] = getattr(placement, field)
    if placement.accelerator:
        resources["limits"][placement.accelerator] = placement.count
    container["resources"] = resources
    if placement.mesh:
        container["env"].append({"name": "PATHWAYS_MESH", "value": placement.mesh})
    if placement.image:
        container["image"] = placement.image
    if placement.node_selector:
        pod["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        pod["tolerations"] = [dict(t) for t in placement.tolerations]
    return deployment


def _service(meta, selector) -> dict[str, Any]:
    # Headless: DNS and Endpoints list every ready pod, so clients balance per replica (gRPC
    # round-robin or the Endpoints watch) instead of pinning one connection to a virtual IP.
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "ports": [
                {
                    "name": "grpc",
                    "port": pods.GRPC_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                }
            ],
        },
    }


def _hpa(meta) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"]},
            "minReplicas": HPA_MIN,
            "maxReplicas": HPA_MAX,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": HPA_CPU_PERCENT},
                    },
                }
            ],
            # Scale down slowly: each removed replica drains its sessions.
            "behavior": {
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                }
            },
        },
    }


def _pdb(meta, selector) -> dict[str, Any]:
    # maxUnavailable rather than minAvailable: a one-replica module can still be drained.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta,
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }
