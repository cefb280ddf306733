"""Kubernetes objects shared by every pathway: gateway, coordinator workers, broker, RBAC and
network policies."""

from __future__ import annotations

from typing import Any

from pathways.k8s import names, pods

BROKER_IMAGE = "docker.io/valkey/valkey:8.1"
BROKER_PORT = 6379
BROKER_USER = 999  # the image's `valkey` user
BROKER_ENV = "PATHWAYS_BROKER_URL"  # what pathways.coordinator.app reads (not Celery's own names)
# The broker's password: key `password` of this Secret (`kubectl create secret generic
# pathways-broker --from-literal=password=...`), given to the broker and to the coordinator
# (pathways.coordinator.app puts it into the URL).
BROKER_SECRET = "pathways-broker"
BROKER_PASSWORD_ENV = "PATHWAYS_BROKER_PASSWORD"
BROKER_URL = f"redis://{names.BROKER}:{BROKER_PORT}/0"  # the password joins it from the env


def broker_password_env(name: str = BROKER_PASSWORD_ENV) -> dict[str, Any]:
    """An env entry holding the broker's password from its Secret."""
    ref = {"secretKeyRef": {"name": BROKER_SECRET, "key": "password"}}
    return {"name": name, "valueFrom": ref}


# Every connection the code opens between Pathways pods, as destination -> (sources, port); the
# network policies admit exactly these (tests/k8s/network_policies_test.py checks the rendered
# policies against its own list of the connections the code makes):
#   gateway -> module      ModuleService calls of generation (executor.remote)
#   coordinator -> module  TrainingService calls of a job trained through the services
#                          (pipeline.client)
#   module -> module       TrainingService.Deliver: activations and gradients sent straight to the
#                          neighbouring stage's server (pipeline.peer)
#   coordinator -> broker  Celery's broker and result backend (coordinator.app)
#   prometheus -> module   scrapes of GET /metrics on the metrics side port (pathways.metrics), from
#                          pods labelled pods.SCRAPER_LABELS in any namespace
# The gateway is the API: its gRPC port (and its plaintext health port) take connections from
# anywhere, its metrics port only from Prometheus. The HTTP front takes no ingress policy.
INGRESS = {
    "module": (("gateway", "coordinator", "module"), pods.GRPC_PORT),
    "broker": (("coordinator",), BROKER_PORT),
}
SCRAPED = ("module", "gateway")  # components whose metrics port only Prometheus may reach
POLICY_NAMES = {"module": "pathways-modules", "broker": names.BROKER, "gateway": names.GATEWAY}
# Egress: every Pathways pod opens connections only to the components the code dials (the
# connections above, from the source's side), to the cluster's DNS, to OpenTelemetry collectors
# (OTLP ports, when OTEL_* exporters are configured) and, the gateway only, to the Kubernetes
# API (its replica discovery watches Endpoints; the API server is no pod, so by port).
EGRESS = {
    "module": (("module", pods.GRPC_PORT),),  # TrainingService.Deliver to the neighbour
    "coordinator": (("module", pods.GRPC_PORT), ("broker", BROKER_PORT)),
    "gateway": (("module", pods.GRPC_PORT),),
    "http-front": (("gateway", pods.GRPC_PORT),),
    "broker": (),
}
DNS_LABELS = {"k8s-app": "kube-dns"}  # CoreDNS/kube-dns pods, in any namespace
API_SERVER_PORTS = (443, 6443)
OTLP_PORTS = (4317, 4318)


def _meta(name: str, component: str) -> dict[str, Any]:
    return {"name": name, "labels": names.labels(component)}


def _selector(component: str) -> dict[str, str]:
    return {names.APP_LABEL: names.APP, names.COMPONENT_LABEL: component}


def gateway(
    image: str,
    checkpoint_uri: str,
    state_uri: str = pods.DEFAULT_GATEWAY_STATE_URI,
    colocate: list[str] = (),
) -> list[dict[str, Any]]:
    """Gateway Deployment + Service. The gateway finds each module's replicas by watching the
    Endpoints of the module's headless Service (pathways.k8s.discovery, with the discovery
    ServiceAccount), so `kubectl scale` changes the replicas new sessions go to; it keeps its
    pathway table's changes in a file on the volume `state_uri` (pods.GATEWAY_STATE_DIR).
    `colocate`: groups of modules one server hosts ("attn-0,attn-1"; their Service is the
    group's), passed as --colocate."""
    volumes, mounts = pods.common_volumes(checkpoint_uri)
    state_volume, state_mount = pods.gateway_state_volume(state_uri)
    tls_volume, tls_mount, tls_env = pods.tls("gateway")
    keys_volume = {
        "name": "api-keys",
        "secret": {"secretName": pods.API_KEYS_SECRET, "defaultMode": 0o440},
    }
    keys_mount = {"name": "api-keys", "mountPath": pods.API_KEYS_DIR, "readOnly": True}
    volumes = [*volumes, tls_volume, keys_volume, state_volume]
    mounts = [*mounts, tls_mount, keys_mount, state_mount]
    args = [
        "--checkpoint",
        pods.CHECKPOINT_DIR,
        "--host",
        "0.0.0.0",
        "--port",
        str(pods.GRPC_PORT),
        "--discover",
        "k8s",
        "--health-port",
        str(pods.HEALTH_PORT),
        "--metrics-port",
        str(pods.METRICS_PORT),
        "--pathways-file",
        pods.gateway_pathways_file(checkpoint_uri),
        "--grace-s",
        str(pods.GATEWAY_GRACE_S),
        *(a for g in colocate for a in ("--colocate", g)),
    ]
    container = {
        "name": "gateway",
        "image": image,
        "args": args,
        "env": [
            pods.namespace_env(),  # the namespace whose Endpoints discovery watches
            *tls_env,  # TLS for users, its client certificate at the module servers
            # Users present API keys (roles generate, admin); hashed in the Secret.
            {"name": "PATHWAYS_API_KEYS", "value": f"{pods.API_KEYS_DIR}/keys.json"},
        ],
        "ports": [
            {"name": "grpc", "containerPort": pods.GRPC_PORT, "protocol": "TCP"},
            pods.health_port(),
            pods.metrics_port(),
        ],
        "resources": {
            "requests": {"cpu": "250m", "memory": "512Mi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
        **pods.grpc_probes(),
        "securityContext": pods.container_security(),
        "volumeMounts": mounts,
    }
    meta = _meta(names.GATEWAY, "gateway")
    selector = _selector("gateway")
    deployment = pods.deployment(
        meta,
        selector,
        container,
        volumes,
        account=names.DISCOVERY_ACCOUNT,
        grace_s=pods.GATEWAY_GRACE_S + pods.EXIT_MARGIN_S,
        pod_annotations=pods.scrape(),
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
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
    return [deployment, service]


# The front's `--grace-s`: its responses in flight (streams relayed from the gateway) get as
# long as the gateway's own drain.
HTTP_FRONT_GRACE_S = pods.GATEWAY_GRACE_S


def http_front(image: str) -> list[dict[str, Any]]:
    """HTTP front Deployment + Service + HPA + PDB: the OpenAI-compatible API, a client of the
    gateway's Service (TLS with the gateway's CA; callers' API keys are passed on). Stateless:
    it scales on CPU. /metrics on its own port."""
    tls_volume = {
        "name": "tls",
        "secret": {"secretName": pods.TLS_SECRETS["http-front"], "defaultMode": 0o440},
    }
    tls_mount = {"name": "tls", "mountPath": pods.TLS_DIR, "readOnly": True}
    tmp = {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}
    http = {"httpGet": {"path": "/healthz", "port": "http"}}
    ready = {"httpGet": {"path": "/readyz", "port": "http"}}
    container = {
        "name": "http-front",
        "image": image,
        "args": [
            "--gateway",
            f"{names.GATEWAY}:{pods.GRPC_PORT}",
            "--host",
            "0.0.0.0",
            "--port",
            str(pods.HTTP_PORT),
            "--grace-s",
            str(HTTP_FRONT_GRACE_S),
        ],
        # The gateway's certificate is checked against the Service name it dials.
        "env": [{"name": "PATHWAYS_TLS_DIR", "value": pods.TLS_DIR}],
        "ports": [{"name": "http", "containerPort": pods.HTTP_PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": "250m", "memory": "256Mi"},
            "limits": {"cpu": "1", "memory": "512Mi"},
        },
        "startupProbe": {**http, "periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 30},
        # Not ready while the gateway does not answer: Services route to fronts that can serve.
        "readinessProbe": {**ready, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2},
        "livenessProbe": {**http, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
        "securityContext": pods.container_security(),
        "volumeMounts": [tls_mount, {"name": "tmp", "mountPath": "/tmp"}],
    }
    meta = _meta(names.HTTP_FRONT, "http-front")
    selector = _selector("http-front")
    deployment = pods.deployment(
        meta,
        selector,
        container,
        [tls_volume, tmp],
        grace_s=HTTP_FRONT_GRACE_S + pods.EXIT_MARGIN_S,
        pod_annotations=pods.scrape(pods.HTTP_PORT),
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "selector": selector,
            "ports": [
                {
                    "name": "http",
                    "port": 80,
                    "targetPort": "http",
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    }
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"]},
            "minReplicas": 1,
            "maxReplicas": 4,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 70},
                    },
                }
            ],
        },
    }
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta,
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }
    return [deployment, service, hpa, pdb]


def coordinator(
    image: str, checkpoint_uri: str, training_uri: str = pods.DEFAULT_TRAINING_URI
) -> list[dict[str, Any]]:
    """Celery worker Deployment, under the discovery account. Its jobs write their output under
    the training volume (`--out /training/RUN`) and, trained through the module services, call
    the module servers directly."""
    volumes, mounts = pods.common_volumes(checkpoint_uri, training_uri)
    tls_volume, tls_mount, tls_env = pods.tls("coordinator")
    volumes, mounts = [*volumes, tls_volume], [*mounts, tls_mount]
    container = {
        "name": "coordinator",
        "image": image,
        # The worker's one required setting (pathways.coordinator.app), broker and result backend
        # at once; jobs carry their own spec and output paths.
        # Its certificate is its client certificate at the module servers.
        "env": [
            broker_password_env(),
            {"name": BROKER_ENV, "value": BROKER_URL},
            # Jobs read specs and data and write checkpoints only there (paths.check_job).
            {
                "name": "PATHWAYS_JOB_ROOTS",
                "value": ":".join([pods.TRAINING_DIR, pods.CHECKPOINT_DIR, pods.SPEC_DIR]),
            },
            *tls_env,
        ],
        "resources": {
            "requests": {"cpu": "250m", "memory": "512Mi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
        "securityContext": pods.container_security(),
        "volumeMounts": mounts,
    }
    # Celery's warm shutdown finishes the running task; give it the module servers' grace.
    return [
        pods.deployment(
            _meta(names.COORDINATOR, "coordinator"),
            _selector("coordinator"),
            container,
            volumes,
            account=names.DISCOVERY_ACCOUNT,
            grace_s=pods.SHUTDOWN_GRACE_S + pods.EXIT_MARGIN_S,
        )
    ]


def broker() -> list[dict[str, Any]]:
    """A single-replica Valkey (Redis protocol) StatefulSet + Service: the Celery broker."""
    meta = _meta(names.BROKER, "broker")
    selector = _selector("broker")
    container = {
        "name": "valkey",
        "image": BROKER_IMAGE,
        # Append-only file: queued tasks survive a restart. A password (from the Secret) and the
        # broker NetworkPolicy, which admits only the coordinator; protected mode would refuse
        # every non-loopback client.
        "args": [
            "valkey-server",
            "--appendonly",
            "yes",
            "--dir",
            "/data",
            "--protected-mode",
            "no",
            "--requirepass",
            f"$({BROKER_PASSWORD_ENV})",
        ],
        # valkey-cli (the readiness probe) authenticates with VALKEYCLI_AUTH (REDISCLI_AUTH in
        # older releases).
        "env": [
            broker_password_env(),
            broker_password_env("VALKEYCLI_AUTH"),
            broker_password_env("REDISCLI_AUTH"),
        ],
        "ports": [{"name": "redis", "containerPort": BROKER_PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "500m", "memory": "512Mi"},
        },
        "readinessProbe": {
            "exec": {"command": ["valkey-cli", "ping"]},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
        },
        "livenessProbe": {
            "tcpSocket": {"port": "redis"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "securityContext": pods.container_security(),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "serviceName": names.BROKER,
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": meta["labels"]},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": pods.pod_security(BROKER_USER, BROKER_USER),
                    "containers": [container],
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "1Gi"}},
                    },
                }
            ],
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "selector": selector,
            "ports": [
                {"name": "redis", "port": BROKER_PORT, "targetPort": "redis", "protocol": "TCP"}
            ],
        },
    }
    return [statefulset, service]


def rbac() -> list[dict[str, Any]]:
    """The discovery account: read-only access to Endpoints/EndpointSlices in its own namespace."""
    meta = _meta(names.DISCOVERY_ACCOUNT, "gateway")
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": meta,
        "rules": [
            {"apiGroups": [""], "resources": ["endpoints"], "verbs": ["get", "list", "watch"]},
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["get", "list", "watch"],
            },
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": meta,
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": names.DISCOVERY_ACCOUNT,
        },
        # kustomize's namespace transformer fills in the subject's namespace.
        "subjects": [{"kind": "ServiceAccount", "name": names.DISCOVERY_ACCOUNT}],
    }
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}
    return [account, role, binding]


def network_policies() -> list[dict[str, Any]]:
    """One ingress policy per destination in INGRESS: its pods accept connections only from the
    Pathways components listed there, only on its port; the gateway's (the API) from anywhere
    on its gRPC and health ports; one egress policy per component in EGRESS."""

    def tcp(*ports: int) -> list[dict[str, Any]]:
        return [{"protocol": "TCP", "port": p} for p in ports]

    def scrapers_rule() -> dict[str, Any]:
        scrapers = {"namespaceSelector": {}, "podSelector": {"matchLabels": pods.SCRAPER_LABELS}}
        return {"from": [scrapers], "ports": tcp(pods.METRICS_PORT)}

    def gateway_policy() -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(POLICY_NAMES["gateway"], "gateway"),
            "spec": {
                "podSelector": {"matchLabels": _selector("gateway")},
                "policyTypes": ["Ingress"],
                # No `from`: users reach the API from anywhere (API keys decide who may do what).
                "ingress": [{"ports": tcp(pods.GRPC_PORT, pods.HEALTH_PORT)}, scrapers_rule()],
            },
        }

    def egress(component: str) -> dict[str, Any]:
        rules = [
            {"to": [{"podSelector": {"matchLabels": _selector(dst)}}], "ports": tcp(port)}
            for dst, port in EGRESS[component]
        ]
        dns = {"namespaceSelector": {}, "podSelector": {"matchLabels": DNS_LABELS}}
        rules.append({"to": [dns], "ports": [{"protocol": "UDP", "port": 53}, *tcp(53)]})
        if component != "broker":
            rules.append({"ports": tcp(*OTLP_PORTS)})
        if component == "gateway":
            rules.append({"ports": tcp(*API_SERVER_PORTS)})
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(f"pathways-{component}-egress", component),
            "spec": {
                "podSelector": {"matchLabels": _selector(component)},
                "policyTypes": ["Egress"],
                "egress": rules,
            },
        }

    def policy(component: str) -> dict[str, Any]:
        sources, port = INGRESS[component]
        clients = [
            {
                "podSelector": {
                    "matchExpressions": [
                        {"key": names.APP_LABEL, "operator": "In", "values": [names.APP]},
                        {"key": names.COMPONENT_LABEL, "operator": "In", "values": list(sources)},
                    ]
                }
            }
        ]
        ingress = [{"from": clients, "ports": tcp(port)}]
        if component in SCRAPED:
            ingress.append(scrapers_rule())
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(POLICY_NAMES[component], component),
            "spec": {
                "podSelector": {"matchLabels": _selector(component)},
                "policyTypes": ["Ingress"],
                "ingress": ingress,
            },
        }

    return [
        *(policy(component) for component in INGRESS),
        gateway_policy(),
        *(egress(component) for component in EGRESS),
    ]
