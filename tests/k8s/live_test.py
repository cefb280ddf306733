"""Against a real Kubernetes v1.20 API server: apply every rendered workload (modules, gateway,
coordinator, broker, with the volumes they claim), check that each runs with the environment its
code reads, scale modules with `kubectl scale` and `pathways scale`, and watch discovery follow."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from kubernetes import client, config

from pathways import spec as spec_lib
from pathways.k8s import cluster, discovery, names, pods, render
from tests.k8s import entrypoints
from tests.k8s.kube import REPO, for_v1_20, kustomize, wait_for
from tools.cli import main as cli

pytestmark = [
    pytest.mark.k8s,
    # The kit's kubeconfig uses insecure-skip-tls-verify (a throwaway loopback cluster).
    pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"),
]
NAMESPACE = "pathways-live"
MODULES = ["embed", "attn-0", "attn-1", "head"]
TRAINING_CLAIM = "pathways-training"  # render's default training volume
GATEWAY_STATE_CLAIM = "pathways-gateway-state"  # render's default gateway state volume
BROKER_CLAIM = f"data-{names.BROKER}-0"  # the broker StatefulSet's volumeClaimTemplate, pod 0


def _volumes() -> list[dict]:
    """What a cluster provides beside the base: the training and gateway state claims (as the
    dev overlay does) and node-directory volumes pre-bound to them and to the broker's claim (the
    kit has no storage provisioner), so the pods that mount them get scheduled."""

    def volume(name: str, claim: str, mode: str) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"{NAMESPACE}-{name}"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": [mode],
                "storageClassName": "",
                "hostPath": {"path": f"/var/lib/pathways/{name}"},
                "claimRef": {"namespace": NAMESPACE, "name": claim},
            },
        }

    def bound_claim(name: str, claim: str, mode: str) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": NAMESPACE},
            "spec": {
                "accessModes": [mode],
                "storageClassName": "",
                "volumeName": f"{NAMESPACE}-{name}",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }

    return [
        volume("training", TRAINING_CLAIM, "ReadWriteMany"),
        volume("broker", BROKER_CLAIM, "ReadWriteOnce"),
        volume("gateway-state", GATEWAY_STATE_CLAIM, "ReadWriteOnce"),
        bound_claim("training", TRAINING_CLAIM, "ReadWriteMany"),
        bound_claim("gateway-state", GATEWAY_STATE_CLAIM, "ReadWriteOnce"),
    ]


def _kubectl(kubeconfig: str, *args: str) -> str:
    return subprocess.run(
        ["kubectl", "--kubeconfig", kubeconfig, *args], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture(scope="module")
def applied(kubeconfig, tmp_path_factory) -> list[dict]:
    """The tiny example pathway's base, every workload applied to the cluster (modules, gateway,
    coordinator, broker) and running; returns what was applied."""
    base = tmp_path_factory.mktemp("base")
    spec = spec_lib.load(REPO / "examples" / "tiny.yaml")
    render.write(
        render.render(spec, checkpoint_uri="file:///var/lib/pathways/tiny", namespace=NAMESPACE),
        base,
    )
    docs = for_v1_20(kustomize(base))
    # The namespace and volumes first, bound before any pod claims them: the scheduler would retry
    # such a pod only after a backoff.
    volumes = base.parent / "volumes.yaml"
    volumes.write_text(
        yaml.safe_dump_all([d for d in docs if d["kind"] == "Namespace"] + _volumes())
    )
    _kubectl(kubeconfig, "apply", "-f", str(volumes))
    # The volume controller binds a pre-bound claim as soon as it has seen both objects; where it
    # saw the claim first, only its periodic resync (15 s) binds it, and a loaded CI machine has
    # been slower than 30 s.
    claims = [f"pvc/{TRAINING_CLAIM}", f"pvc/{GATEWAY_STATE_CLAIM}"]
    bound = subprocess.run(
        ["kubectl", "--kubeconfig", kubeconfig, "-n", NAMESPACE, "wait"]
        + ["--for=jsonpath={.status.phase}=Bound", "--timeout=120s", *claims],
        capture_output=True,
        text=True,
    )
    if bound.returncode != 0:
        pytest.fail(
            f"claims not bound: {bound.stderr.strip()}\n"
            + _kubectl(kubeconfig, "-n", NAMESPACE, "describe", *claims)
            + _kubectl(kubeconfig, "get", "pv", "-o", "wide")
        )
    manifest = base.parent / "applied.yaml"
    manifest.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] != "Namespace"]))
    _kubectl(kubeconfig, "apply", "-f", str(manifest))
    _kubectl(
        kubeconfig,
        *("-n", NAMESPACE, "wait", "--for=condition=Available", "--timeout=180s"),
        *("deployment", "--all"),
    )
    _kubectl(
        kubeconfig,
        *("-n", NAMESPACE, "rollout", "status", "--timeout=180s"),
        f"statefulset/{names.BROKER}",
    )
    return docs


@pytest.fixture(scope="module")
def api(applied, kubeconfig):
    """An API client of the cluster where the example pathway runs."""
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


def _stored(api, kind: str, items) -> list[dict]:
    """API objects as manifests (camelCase dicts), as the server stored them after defaulting."""
    out = []
    for item in items:
        doc = api.sanitize_for_serialization(item)
        doc["kind"] = kind
        out.append(doc)
    return out


def test_every_workload_runs_with_the_environment_its_code_reads(api, applied):
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    stored = [
        *_stored(api, "Deployment", apps.list_namespaced_deployment(NAMESPACE).items),
        *_stored(api, "StatefulSet", apps.list_namespaced_stateful_set(NAMESPACE).items),
        *_stored(api, "Service", core.list_namespaced_service(NAMESPACE).items),
    ]
    # Everything rendered was accepted (v1.20 lacks HPA v2 and PDB v1: checked offline).
    kinds = {"Deployment", "StatefulSet", "Service"}
    assert {(d["kind"], d["metadata"]["name"]) for d in applied if d["kind"] in kinds} == {
        (d["kind"], d["metadata"]["name"]) for d in stored
    }
    workloads = {d["metadata"]["name"]: d for d in stored if d["kind"] != "Service"}
    assert set(workloads) == {
        *MODULES,
        names.GATEWAY,
        names.HTTP_FRONT,
        names.COORDINATOR,
        names.BROKER,
    }
    for name, d in workloads.items():
        assert (d["status"].get("readyReplicas") or 0) >= 1, f"{name} has no ready replica"

    # The training volume is bound and mounted writable where training output is written; the
    # checkpoint stays read-only everywhere.
    claim = core.read_namespaced_persistent_volume_claim(TRAINING_CLAIM, NAMESPACE)
    assert claim.status.phase == "Bound"
    for name, d in workloads.items():
        mounts = {
            m["name"]: m
            for m in d["spec"]["template"]["spec"]["containers"][0].get("volumeMounts", [])
        }
        if name in (*MODULES, names.COORDINATOR):
            assert mounts["training"]["mountPath"] == pods.TRAINING_DIR
            assert not mounts["training"].get("readOnly"), name
        if "checkpoint" in mounts:
            assert mounts["checkpoint"]["readOnly"] is True, name
    # The gateway's pathway table is kept on its own bound claim, mounted writable.
    claim = core.read_namespaced_persistent_volume_claim(GATEWAY_STATE_CLAIM, NAMESPACE)
    assert claim.status.phase == "Bound"
    gateway = workloads[names.GATEWAY]["spec"]["template"]["spec"]["containers"][0]
    (state,) = (m for m in gateway["volumeMounts"] if m["name"] == "gateway-state")
    assert state["mountPath"] == pods.GATEWAY_STATE_DIR and not state.get("readOnly")
    assert pods.GATEWAY_STATE_DIR + "/" in " ".join(gateway["args"])

    started = entrypoints.check_workloads(stored)
    assert set(started) == {*MODULES, names.GATEWAY, names.HTTP_FRONT, names.COORDINATOR}
