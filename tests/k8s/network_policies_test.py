"""The rendered NetworkPolicies against the connections the code makes, checked statically (the
local Kubernetes kit has no CNI, so nothing there enforces a policy).

The ports come from the code too: a module pod is reached on the port its server listens on (the
module server's own settings, parsed from the rendered args and env), the broker at the address in
the coordinator's broker URL (through the Service of that name to its pods' port).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.k8s import entrypoints
from tests.k8s.kube import REPO, kustomize

OVERLAYS = sorted(p.name for p in (REPO / "k8s" / "overlays").iterdir() if p.is_dir())
WORKLOADS = ("Deployment", "StatefulSet")
COMPONENT = "app.kubernetes.io/component"
NS_NAME_LABEL = "kubernetes.io/metadata.name"  # every namespace carries it (Kubernetes >= 1.21)


@dataclass(frozen=True)
class Pod:
    name: str  # its workload's
    namespace: str
    labels: dict[str, str]
    ports: dict[str, int]  # container port name -> number
    container: dict[str, Any] | None = None

    @property
    def component(self) -> str:
        return self.labels.get(COMPONENT, "")


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (an empty selector selects everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        has, value, values = e["key"] in labels, labels.get(e["key"]), e.get("values", [])
        ok = {
            "In": has and value in values,
            "NotIn": not (has and value in values),
            "Exists": has,
            "DoesNotExist": not has,
        }[e["operator"]]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict[str, Any], pod: Pod, policy_ns: str) -> bool:
    if "ipBlock" in peer:
        raise NotImplementedError("ipBlock peers: extend this check before rendering them")
    if "namespaceSelector" in peer:
        ns_ok = _selects(peer["namespaceSelector"], {NS_NAME_LABEL: pod.namespace})
    else:
        ns_ok = pod.namespace == policy_ns
    return ns_ok and _selects(peer.get("podSelector", {}), pod.labels)


def _port_matches(rule_ports: list[dict[str, Any]] | None, dst: Pod, port: int) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str):
            want = dst.ports.get(want)
            if want is None:
                continue
        if want <= port <= p.get("endPort", want):
            return True
    return False


def _types(policy: dict[str, Any]) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def allowed(policies: list[dict[str, Any]], src: Pod, dst: Pod, port: int) -> bool:
    """Whether NetworkPolicies let `src` open a TCP connection to `dst` on `port`."""

    def side(pod: Pod, kind: str, peers_key: str, other: Pod) -> bool:
        applying = [
            p
            for p in policies
            if p["metadata"]["namespace"] == pod.namespace
            and kind.capitalize() in _types(p)
            and _selects(p["spec"]["podSelector"], pod.labels)
        ]
        if not applying:
            return True  # a pod no policy selects for this direction is not isolated
        return any(
            _port_matches(rule.get("ports"), dst, port)
            and (
                peers_key not in rule
                or any(
                    _peer_matches(peer, other, p["metadata"]["namespace"])
                    for peer in rule[peers_key]
                )
            )
            for p in applying
            for rule in p["spec"].get(kind, [])
        )

    return side(dst, "ingress", "from", src) and side(src, "egress", "to", dst)


def _pods(docs: list[dict[str, Any]]) -> dict[str, Pod]:
    pods = {}
    for d in docs:
        if d["kind"] not in WORKLOADS:
            continue
        template = d["spec"]["template"]
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
        name = d["metadata"]["name"]
        pods[name] = Pod(
            name, d["metadata"]["namespace"], template["metadata"]["labels"], ports, container
        )
    return pods


def _needed(docs, pods: dict[str, Pod]) -> list[tuple[Pod, Pod, int, str]]:
    """(source, destination, port, why): every connection the code opens between pods."""
    modules = [p for p in pods.values() if p.component == "module"]
    (gateway,) = (p for p in pods.values() if p.component == "gateway")
    (coordinator,) = (p for p in pods.values() if p.component == "coordinator")
    listen = {m.name: entrypoints.start(m.container, m.namespace).args[0].port for m in modules}
    out = []
    for front in (p for p in pods.values() if p.component == "http-front"):
        gw_port = int(
            entrypoints.start(front.container, front.namespace).args[0].gateway.split(":")[1]
        )
        out.append((front, gateway, gw_port, "OpenAI API: GatewayService calls (pathways.client)"))
    for m in modules:
        port = listen[m.name]
        out.append((gateway, m, port, "generation: ModuleService calls (executor.remote)"))
        out.append((coordinator, m, port, "training job: TrainingService (pipeline.client)"))
    for a, b in itertools.permutations(modules, 2):
        out.append(
            (a, b, listen[b.name], "training step: Deliver to the neighbour (pipeline.peer)")
        )

    url = urlparse(entrypoints.start(coordinator.container, coordinator.namespace).broker_url)
    (service,) = (
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == url.hostname
    )
    (svc_port,) = (p for p in service["spec"]["ports"] if p["port"] == url.port)
    brokers = [
        p for p in pods.values() if _selects({"matchLabels": service["spec"]["selector"]}, p.labels)
    ]
    assert brokers, f"the broker URL's Service {url.hostname} selects no workload"
    for b in brokers:
        target = svc_port.get("targetPort", svc_port["port"])
        port = b.ports[target] if isinstance(target, str) else target
        out.append((coordinator, b, port, f"Celery broker and results ({url.geturl()})"))
    return out


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    docs = kustomize(REPO / "k8s" / "overlays" / request.param)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    return docs, _pods(docs), policies


def test_every_connection_the_code_makes_is_allowed(rendered):
    docs, pods, policies = rendered
    needed = _needed(docs, pods)
    blocked = [
        f"{src.name} -> {dst.name}:{port} ({why})"
        for src, dst, port, why in needed
        if not allowed(policies, src, dst, port)
    ]
    assert not blocked, "NetworkPolicies block traffic the code needs:\n" + "\n".join(blocked)
    # Clients of the gateway come from anywhere (it is the API); kubelet probes are not policed.
    client = Pod("client", "elsewhere", {"app": "client"}, {})
    gateway = next(p for p in pods.values() if p.component == "gateway")
    assert allowed(policies, client, gateway, gateway.ports["grpc"])


def test_nothing_else_reaches_modules_or_the_broker(rendered):
    docs, pods, policies = rendered
    needed = {(s.name, d.name, port) for s, d, port, _ in _needed(docs, pods)}
    protected = [p for p in pods.values() if p.component in ("module", "broker")]
    ns = protected[0].namespace
    strangers = [
        Pod("stranger", ns, {"app": "other"}, {}),  # another app's pod in the namespace
        # Pathways' own labels, but another namespace (another deployment of Pathways).
        Pod("other-gateway", "elsewhere", {**pods["pathways-gateway"].labels}, {}),
    ]
    opened = []
    for dst in protected:
        dst_ports = {*dst.ports.values(), 8080}
        for src in [*pods.values(), *strangers]:
            for port in dst_ports:
                if (src.name, dst.name, port) in needed or src.name == dst.name:
                    continue
                if allowed(policies, src, dst, port):
                    opened.append(f"{src.name} -> {dst.name}:{port}")
    assert not opened, "NetworkPolicies allow connections nothing makes:\n" + "\n".join(opened)
    # Spot checks of the above, spelled out.
    broker = next(p for p in pods.values() if p.component == "broker")
    assert not allowed(policies, pods["pathways-gateway"], broker, broker.ports["redis"])
    assert not allowed(policies, pods["embed"], broker, broker.ports["redis"])
    assert not allowed(policies, broker, pods["embed"], pods["embed"].ports["grpc"])


def test_prometheus_may_scrape_the_metrics_ports_and_nothing_else(rendered):
    _, pods, policies = rendered
    prometheus = Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, {})
    other = Pod("other", "monitoring", {"app.kubernetes.io/name": "grafana"}, {})
    scraped = [p for p in pods.values() if "metrics" in p.ports or p.component == "http-front"]
    assert {p.component for p in scraped} == {"module", "gateway", "http-front"}
    for p in scraped:
        port = p.ports.get("metrics", p.ports.get("http"))
        assert allowed(policies, prometheus, p, port), p.name
        if p.component == "module":
            assert not allowed(policies, other, p, port)
            assert not allowed(policies, prometheus, p, p.ports["grpc"])
    front = next(p for p in pods.values() if p.component == "http-front")
    gateway = next(p for p in pods.values() if p.component == "gateway")
    assert allowed(policies, front, gateway, gateway.ports["grpc"])


def test_every_policy_selects_a_workload(rendered):
    _, pods, policies = rendered
    for p in policies:
        assert any(_selects(p["spec"]["podSelector"], pod.labels) for pod in pods.values()), p


def test_the_checker_sees_a_missing_rule():
    """Module-to-module training traffic was once blocked: the check must notice that."""
    docs = kustomize(REPO / "k8s" / "overlays" / "dev")
    pods = _pods(docs)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                for e in peer["podSelector"].get("matchExpressions", []):
                    if e["key"] == COMPONENT:
                        e["values"] = [v for v in e["values"] if v != "module"]
    embed, attn = pods["embed"], pods["attn-0"]
    assert allowed(policies, pods["pathways-gateway"], attn, attn.ports["grpc"])
    assert not allowed(policies, embed, attn, attn.ports["grpc"])


def test_pods_open_connections_only_where_the_code_goes(rendered):
    """Egress: each Pathways pod reaches the components it dials (checked above), the cluster's
    DNS, OTLP collectors and (the gateway) the Kubernetes API; nothing else, e.g. not a database
    in the namespace or a service on the internet."""
    docs, pods, policies = rendered
    needed = {(s.name, d.name, port) for s, d, port, _ in _needed(docs, pods)}
    ns = pods["pathways-gateway"].namespace
    dns = Pod("coredns", "kube-system", {"k8s-app": "kube-dns"}, {})
    elsewhere = [
        Pod("database", ns, {"app": "postgres"}, {}),
        Pod("internet", "outside", {}, {}),
    ]
    opened = []
    for src in pods.values():
        for dst in [*elsewhere, *pods.values()]:
            for port in (22, 80, 5432, 6379, 8080, 50051, 50052, 9464):
                if src.name == dst.name or (src.name, dst.name, port) in needed:
                    continue
                ingress_open = dst in elsewhere or not any(
                    "Ingress" in _types(p) and _selects(p["spec"]["podSelector"], dst.labels)
                    for p in policies
                )
                # Only egress is judged here (destinations without ingress policies).
                if ingress_open and allowed(policies, src, dst, port):
                    opened.append(f"{src.name} -> {dst.name}:{port}")
        assert allowed(policies, src, dns, 53), src.name  # names resolve
    assert not opened, "egress allows connections nothing makes:\n" + "\n".join(opened)
    api = Pod("kube-apiserver", "default", {}, {})
    assert allowed(policies, pods["pathways-gateway"], api, 443)  # discovery watches Endpoints
    assert not allowed(policies, pods["embed"], api, 443)
    collector = Pod("otel-collector", "observability", {}, {})
    assert allowed(policies, pods["embed"], collector, 4317)
    broker = next(p for p in pods.values() if p.component == "broker")
    assert not allowed(policies, broker, collector, 4317)  # the broker dials nothing
