"""End to end on a real Kubernetes v1.20 control plane with a kubelet that runs pods as processes:
the rendered module Deployments serve generation through a gateway that discovers replicas from
the Services' Endpoints; `kubectl scale` up moves traffic onto the new replicas, and scaling back
down loses no request. attn-1 and head are co-located (`render(colocate=...)`: one Deployment and
Service, attn-1-head, whose server steps both as one program; the gateway told with --colocate)."""

from __future__ import annotations

import base64
import subprocess
import threading
from dataclasses import dataclass, field

import grpc
import pytest
import yaml
from kubernetes import client, config

from pathways import certs, transport
from pathways import generate as gen
from pathways import spec as spec_lib
from pathways.deploy import launcher
from pathways.k8s import cluster, discovery, names, pods, render
from pathways.sampling import SamplingParams
from pathways.serving import testing
from pathways.tokenizers import ByteTokenizer
from pathways.v1 import gateway_pb2, gateway_pb2_grpc, module_pb2, module_pb2_grpc
from tests.k8s.kube import REPO, control_plane, for_v1_20, kit, kustomize, wait_for
from tests.k8s.process_kubelet import ProcessKubelet

pytestmark = [
    pytest.mark.k8s,
    pytest.mark.slow,
    # The kit's kubeconfig uses insecure-skip-tls-verify (a throwaway loopback cluster).
    pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"),
]
NAMESPACE = "pathways-e2e"
NODE = "process-node"
IMAGES = {"module-server": "services.module_server.main", "gateway": "services.gateway.main"}
# The gateway runs outside the cluster (a kubeconfig, not a service account) and generation needs
# no coordinator, broker or HTTP front: their workloads are not applied; everything else is.
COLOCATED = ["attn-1", "head"]  # one server; pathway "tiny" steps through both
PATHWAY = "tiny"
NOT_APPLIED = {
    ("gateway", "Deployment"),
    ("coordinator", "Deployment"),
    ("broker", "StatefulSet"),
    ("http-front", "Deployment"),
}


def _kubectl(kubeconfig: str, *args: str) -> str:
    return subprocess.run(
        ["kubectl", "--kubeconfig", kubeconfig, *args], check=True, capture_output=True, text=True
    ).stdout


@dataclass
class Deployed:
    kubeconfig: str
    api: client.ApiClient
    kubelet: ProcessKubelet
    gateway: launcher.Process
    local: object  # LocalExecutor over the same checkpoint: the reference text


# The test's own certificate (servers check it), checking theirs as the rendered pods do.
CLIENT_TLS: list[transport.TLSConfig] = []


def _channel(address: str):
    return transport.channel(address, tls=CLIENT_TLS[0])


def _tls_secret(name: str, directory) -> dict:
    """A cert-manager-style Secret (tls.crt, tls.key, ca.crt) from a `pathways certs` folder."""
    data = {
        f: base64.b64encode((directory / f).read_bytes()).decode()
        for f in ("tls.crt", "tls.key", "ca.crt")
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": data,
    }


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    kit()  # skips with the reason when the kit or kubectl is absent
    tmp = tmp_path_factory.mktemp("scaling")
    ckpt = tmp / "checkpoint"
    local = testing.make_checkpoint(ckpt)
    base = tmp / "base"
    spec = spec_lib.load(REPO / "examples" / "tiny.yaml")
    training = tmp / "training"  # the test kubelet mounts a hostPath as the folder itself
    training.mkdir()
    files = render.render(
        spec,
        checkpoint_uri=f"file://{ckpt}",
        namespace=NAMESPACE,
        training_uri=f"file://{training}",
        colocate=[COLOCATED],
    )
    render.write(files, base)
    docs = [
        d
        for d in for_v1_20(kustomize(base))
        if (d["metadata"].get("labels", {}).get(names.COMPONENT_LABEL), d["kind"])
        not in NOT_APPLIED
    ]
    # Mutual TLS as rendered: the module Secret, and certificates for the gateway and the test.
    tls = certs.create(tmp / "tls", ["module", "gateway", "client"], hosts=[pods.TLS_SERVER_NAME])
    docs.append(_tls_secret(pods.TLS_SECRETS["module"], tls["module"]))
    CLIENT_TLS[:] = [transport.TLSConfig.from_dir(tls["client"], pods.TLS_SERVER_NAME)]
    (tmp / "applied.yaml").write_text(yaml.safe_dump_all(docs))
    logs = tmp / "logs"
    logs.mkdir()

    with control_plane(tmp / "k8s") as (kubeconfig, _):
        api = client.ApiClient(config.new_client_from_config(kubeconfig).configuration)
        kubelet = ProcessKubelet(api, NAMESPACE, NODE, IMAGES, logs).start()
        gateway = None
        try:
            _kubectl(kubeconfig, "apply", "-f", str(tmp / "applied.yaml"))
            _kubectl(
                kubeconfig,
                *("-n", NAMESPACE, "wait", "--for=condition=Available", "--timeout=240s"),
                *("deployment", "-l", f"{names.COMPONENT_LABEL}=module"),
            )
            port = launcher.free_port()
            argv = ["services.gateway.main", "--checkpoint", str(ckpt), "--port", str(port)]
            argv += ["--discover", "k8s", "--kubeconfig", kubeconfig, "--namespace", NAMESPACE]
            argv += ["--colocate", ",".join(COLOCATED)]
            with open(logs / "gateway.log", "w") as out:
                # grpc_proxy: the gateway reaches pod IPs through the test kubelet's pod network.
                env = {
                    "grpc_proxy": kubelet.network.url,
                    **transport.TLSConfig.from_dir(tls["gateway"], pods.TLS_SERVER_NAME).env(),
                }
                gateway = launcher.Process("gateway", argv, port, env=env, log=out)
            launcher.wait_healthy(gateway.address, gateway.proc, timeout=60, tls=CLIENT_TLS[0])
            yield Deployed(kubeconfig, api, kubelet, gateway, local)
        finally:
            if gateway is not None:
                gateway.stop()
            kubelet.stop()


@dataclass
class Traffic:
    """Generation requests through the gateway from `clients` threads until stopped."""

    address: str
    clients: int = 2
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Traffic:
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self, i: int) -> None:
        with _channel(self.address) as ch:
            gw = gateway_pb2_grpc.GatewayServiceStub(ch)
            k = 0
            while not self._stop.is_set():
                req = gateway_pb2.GenerateRequest(
                    pathway=PATHWAY,
                    prompt=f"client {i} request {k}:",
                    sampling=gateway_pb2.SamplingOptions(max_new_tokens=8),
                )
                try:
                    n = len(list(gw.Generate(req, timeout=60)))
                    assert n == 8, f"{n} tokens"
                    with self._lock:
                        self.ok += 1
                except (grpc.RpcError, AssertionError) as e:
                    with self._lock:
                        self.failures.append(f"client {i} request {k}: {e}")
                k += 1


def _describe(address: str) -> module_pb2.DescribeResponse:
    with _channel(address) as ch:
        stub = module_pb2_grpc.ModuleServiceStub(ch)
        return stub.Describe(module_pb2.DescribeRequest(), timeout=10)


def _requests(address: str) -> int:
    return _describe(address).requests


LONG_PROMPT, LONG_N = "def scale(replicas):", 64


def _long_generation(address: str, out: list) -> None:
    """One long greedy generation; appends its token ids (or the error)."""
    req = gateway_pb2.GenerateRequest(
        pathway=PATHWAY,
        prompt=LONG_PROMPT,
        sampling=gateway_pb2.SamplingOptions(max_new_tokens=LONG_N),
    )
    with _channel(address) as ch:
        try:
            out.append(
                [
                    e.token_id
                    for e in gateway_pb2_grpc.GatewayServiceStub(ch).Generate(req, timeout=120)
                ]
            )
        except grpc.RpcError as e:
            out.append(f"{e.code()}: {e.details()}")


def _endpoints(api, service: str) -> list[str]:
    eps = client.CoreV1Api(api).read_namespaced_endpoints(service, NAMESPACE)
    return discovery.ready_addresses(eps)


def test_scaling_a_module_moves_traffic_and_loses_no_request(deployed):
    d = deployed
    attn = lambda: d.kubelet.running(names.MODULE_LABEL, "attn-0")  # noqa: E731
    assert len(attn()) == 1 and len(_endpoints(d.api, "attn-0")) == 1
    traffic = Traffic(d.gateway.address).start()
    try:
        wait_for(lambda: traffic.ok >= 4 or traffic.failures, 60, "first generations")
        first = attn()[0]
        assert _requests(first.address) > 0

        _kubectl(d.kubeconfig, "-n", NAMESPACE, "scale", "deployment/attn-0", "--replicas=3")
        wait_for(lambda: len(_endpoints(d.api, "attn-0")) == 3, 120, "3 ready attn-0 endpoints")
        replicas = attn()
        assert len(replicas) == 3
        # Every replica, the two new ones included, serves generation traffic.
        wait_for(
            lambda: all(_requests(r.address) > 0 for r in replicas) or traffic.failures,
            60,
            "requests on every attn-0 replica",
        )
        counts = {r.name: _requests(r.address) for r in replicas}
        assert all(counts.values()), counts

        # Three long generations in flight while scaling down. Sessions go to the least loaded
        # replica and the two short-request clients hold at most two sessions, so at least one
        # long session sits on a replica that is about to be removed.
        long_out: list = []
        longs = [
            threading.Thread(target=_long_generation, args=(d.gateway.address, long_out))
            for _ in range(3)
        ]
        for t in longs:
            t.start()
        wait_for(
            lambda: sum(_describe(r.address).sessions for r in replicas) >= 3 or long_out,
            30,
            "the long sessions to open",
        )
        held = {r.name: _describe(r.address).sessions for r in replicas}

        _kubectl(d.kubeconfig, "-n", NAMESPACE, "scale", "deployment/attn-0", "--replicas=1")
        wait_for(lambda: len(_endpoints(d.api, "attn-0")) == 1, 60, "1 ready attn-0 endpoint")
        for t in longs:
            t.join(timeout=120)
        wait_for(lambda: len(attn()) == 1, 60, "removed attn-0 processes to exit")
        survivor = attn()[0]
        assert any(n for name, n in held.items() if name != survivor.name), held
        want = gen.generate(
            d.local,
            PATHWAY,
            [LONG_PROMPT],
            ByteTokenizer(),
            SamplingParams(max_new_tokens=LONG_N),
        )[0].token_ids
        assert long_out == [want] * 3
        before, done = _requests(survivor.address), traffic.ok
        wait_for(lambda: traffic.ok >= done + 4 or traffic.failures, 60, "generations after")
        assert traffic.failures == []  # the cause, if the next check fails
        assert _requests(survivor.address) > before
    finally:
        traffic.stop()
    assert traffic.failures == []
    assert traffic.ok >= 12
    # The other servers were not touched; the co-located pair is one server, one Service.
    others = ("embed", "attn-1-head")
    assert [len(d.kubelet.running(names.MODULE_LABEL, m)) for m in others] == [1, 1]
    assert len(_endpoints(d.api, "attn-1-head")) == 1
    assert d.kubelet.running(names.MODULE_LABEL, "head") == []
    # `pathways k8s scale head` scales head's server, the group's (here to the same count).
    assert cluster.scale(d.api, NAMESPACE, "head", 1) == 1
