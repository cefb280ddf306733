"""Against a real Kubernetes v1.20 API server: apply the rendered manifests, scale modules with
`kubectl scale` and `pathways scale`, and watch discovery follow."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from kubernetes import client, config

from pathways import spec as spec_lib
from pathways.k8s import cluster, discovery, render
from tests.k8s.kube import REPO, for_v1_20, kustomize, wait_for
from tools.cli import main as cli

pytestmark = [
    pytest.mark.k8s,
    # The kit's kubeconfig uses insecure-skip-tls-verify (a throwaway loopback cluster).
    pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"),
]
NAMESPACE = "pathways-live"
MODULES = ["embed", "attn-0", "attn-1", "head"]


def _kubectl(kubeconfig: str, *args: str) -> str:
    return subprocess.run(
        ["kubectl", "--kubeconfig", kubeconfig, *args], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture(scope="module")
def api(kubeconfig, tmp_path_factory):
    """The tiny example pathway applied to the cluster, every module Ready; an API client."""
    base = tmp_path_factory.mktemp("base")
    spec = spec_lib.load(REPO / "examples" / "tiny.yaml")
    render.write(
        render.render(spec, checkpoint_uri="file:///var/lib/pathways/tiny", namespace=NAMESPACE),
        base,
    )
    manifest = base.parent / "applied.yaml"
    manifest.write_text(yaml.safe_dump_all(for_v1_20(kustomize(base))))
    _kubectl(kubeconfig, "apply", "-f", str(manifest))
    _kubectl(
        kubeconfig,
        "-n",
        NAMESPACE,
        "wait",
        "--for=condition=Available",
        "--timeout=60s",
        "deployment",
        "--all",
    )
    return client.ApiClient(config.new_client_from_config(kubeconfig).configuration)


def _deployments(api) -> dict[str, tuple[int, int, int]]:
    """name -> (generation, desired, ready)."""
    items = client.AppsV1Api(api).list_namespaced_deployment(NAMESPACE).items
    return {
        d.metadata.name: (d.metadata.generation, d.spec.replicas, d.status.ready_replicas or 0)
        for d in items
    }


def test_scale_one_module_leaves_the_others(api, kubeconfig, capsys):
    before = _deployments(api)
    assert {m: before[m][1:] for m in MODULES} == {m: (1, 1) for m in MODULES}

    _kubectl(kubeconfig, "-n", NAMESPACE, "scale", "deployment/attn-0", "--replicas=3")
    rc = cli.main(
        ["scale", "attn-1", "--replicas", "2", "--namespace", NAMESPACE, "--kubeconfig", kubeconfig]
    )
    assert rc == 0
    assert "attn-1: replicas 1 -> 2" in capsys.readouterr().out

    wait_for(
        lambda: _deployments(api)["attn-0"][1:] == (3, 3)
        and _deployments(api)["attn-1"][1:] == (2, 2),
        30,
        "attn-0 3/3 and attn-1 2/2 ready",
    )
    after = _deployments(api)
    for name, state in before.items():
        if name not in ("attn-0", "attn-1"):
            assert after[name] == state, f"{name} changed: {state} -> {after[name]}"

    rows = {r.module: (r.desired, r.ready) for r in cluster.status(api, NAMESPACE)}
    assert rows == {"embed": (1, 1), "attn-0": (3, 3), "attn-1": (2, 2), "head": (1, 1)}
    assert cli.main(["status", "--namespace", NAMESPACE, "--kubeconfig", kubeconfig]) == 0
    assert "attn-0        3      3           3" in capsys.readouterr().out


def test_scale_errors_are_one_line(api, kubeconfig, capsys):
    args = ["--replicas", "2", "--kubeconfig", kubeconfig]
    assert cli.main(["scale", "nope", "--namespace", NAMESPACE, *args]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"pathways scale: error: unknown module 'nope' in namespace '{NAMESPACE}'; "
        "known: attn-0, attn-1, embed, head\n"
    )
    assert cli.main(["scale", "embed", "--namespace", "absent", *args]) == 2
    assert capsys.readouterr().err == "pathways scale: error: namespace 'absent' not found\n"
    # The gateway is a Deployment too, but not a module.
    assert cli.main(["scale", "pathways-gateway", "--namespace", NAMESPACE, *args]) == 2


def test_discovery_follows_scaling(api, kubeconfig):
    watcher = discovery.EndpointsWatcher(api, NAMESPACE, MODULES).start()
    changes: list[tuple[str, list[str]]] = []
    watcher.subscribe(lambda module, replicas: changes.append((module, replicas)))
    try:
        assert len(watcher.replicas("head")) == 1
        assert watcher.replicas("head")[0].endswith(":50051")
        embed = watcher.replicas("embed")

        cluster.scale(api, NAMESPACE, "head", 3)
        wait_for(lambda: len(watcher.replicas("head")) == 3, 30, "3 head replicas in discovery")
        _kubectl(kubeconfig, "-n", NAMESPACE, "scale", "deployment/head", "--replicas=1")
        wait_for(lambda: len(watcher.replicas("head")) == 1, 30, "1 head replica in discovery")

        assert watcher.replicas("embed") == embed
        assert {m for m, _ in changes} == {"head"}
        assert [len(r) for _, r in changes][-1] == 1 and max(len(r) for _, r in changes) == 3
    finally:
        watcher.stop()
