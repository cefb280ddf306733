"""Offline checks of the committed k8s/: the base is the render of examples/tiny.yaml, every
overlay renders with kustomize and validates against Kubernetes 1.30 schemas (strict), and each
gives its pods the volumes they write (claims the dev overlay creates, the gateway's state)."""

from __future__ import annotations

from pathlib import PurePosixPath

import kubernetes_validate
import pytest

from pathways import spec as spec_lib
from pathways.k8s import render
from tests.k8s.kube import REPO, kustomize
from tools.cli import main as cli

K8S = REPO / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
VALIDATE_VERSION = "1.30.0"
GATEWAY = "pathways-gateway"


def test_overlays_exist():
    assert {"dev", "prod"} <= set(OVERLAYS)


def test_base_is_the_render_of_the_example_spec(tmp_path):
    assert (
        cli.main(
            [
                "k8s",
                "render",
                "--spec",
                str(REPO / "examples" / "tiny.yaml"),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rendered = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.yaml")}
    committed = {p.relative_to(K8S / "base"): p.read_text() for p in (K8S / "base").rglob("*.yaml")}
    assert sorted(committed) == sorted(rendered)
    stale = [str(p) for p in committed if committed[p] != rendered[p]]
    assert not stale, (
        f"k8s/base is stale ({', '.join(stale)}): run `pathways k8s render "
        f"--spec examples/tiny.yaml --out k8s/base`"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    docs = kustomize(K8S / "overlays" / overlay)
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, VALIDATE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}")
    assert not errors, "\n".join(errors)

    kinds = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], set()).add(doc["metadata"]["name"])
    modules = {"embed", "attn-0", "attn-1", "head"}
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert modules <= kinds[kind], kind
    assert {"pathways-gateway", "pathways-coordinator"} <= kinds["Deployment"]
    assert kinds["StatefulSet"] == {"pathways-broker"}
    assert {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "NetworkPolicy",
        "ConfigMap",
        "Namespace",
    } <= set(kinds)
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == kinds["Namespace"]
    for doc in docs:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] in modules:
            assert doc["spec"]["replicas"] >= 1  # each overlay pins a starting count


def test_validation_catches_a_bad_manifest():
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"replicas": "two", "selector": {}, "template": {}},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VALIDATE_VERSION, strict=True)


def test_a_spec_with_unusual_module_names_renders_valid_manifests(tmp_path):
    data = {
        "modules": {
            "Embed.Main": {"kind": "embedding", "vocab_size": 11, "d_model": 6, "max_seq_len": 13},
            "attn_0": {
                "kind": "attention",
                "d_model": 6,
                "n_layers": 1,
                "n_heads": 2,
                "max_seq_len": 13,
            },
            "LM_head": {"kind": "decoding", "d_model": 6, "vocab_size": 11},
        },
        "pathways": {"p": ["Embed.Main", "attn_0", "LM_head"]},
    }
    files = render.render(spec_lib.from_dict(data), namespace="team-a")
    render.write(files, tmp_path)
    docs = kustomize(tmp_path)
    for doc in docs:
        kubernetes_validate.validate(doc, VALIDATE_VERSION, strict=True)
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    assert deployments == {
        "embed-main",
        "attn-0",
        "lm-head",
        "pathways-gateway",
        "pathways-coordinator",
        "pathways-http-front",
    }
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"team-a"}


def test_dev_overlay_creates_the_claims_its_pods_mount():
    docs = kustomize(K8S / "overlays" / "dev")
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    mounted = {
        v["persistentVolumeClaim"]["claimName"]
        for d in docs
        if d["kind"] == "Deployment"
        for v in d["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert mounted == {"pathways-checkpoints", "pathways-training", "pathways-gateway-state"}
    assert mounted <= claims


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_keeps_its_pathway_table_on_a_volume_only_it_writes(overlay):
    """The gateway's --pathways-file lies on a writable volume: a claim when one replica runs
    (a restarted or rescheduled pod serves the changes again), a volume per pod when several do
    (two gateways writing one file would each overwrite the other's table)."""
    docs = kustomize(K8S / "overlays" / overlay)
    (d,) = (d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == GATEWAY)
    pod = d["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = c["args"]
    assert args.count("--pathways-file") == 1, args
    path = PurePosixPath(args[args.index("--pathways-file") + 1])
    (mount,) = (m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent))
    assert not mount.get("readOnly"), mount
    (volume,) = (v for v in pod["volumes"] if v["name"] == mount["name"])
    if d["spec"].get("replicas", 1) == 1:
        assert volume["persistentVolumeClaim"]["claimName"] == "pathways-gateway-state"
    else:
        assert set(volume) == {"name", "emptyDir"}, volume
