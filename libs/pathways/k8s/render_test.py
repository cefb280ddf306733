import copy

import pytest
import yaml

from pathways import spec as spec_lib
from pathways.k8s import render

SPEC = {
    "modules": {
        "embed": {"kind": "embedding", "vocab_size": 11, "d_model": 6, "max_seq_len": 13},
        "attn_0": {
            "kind": "attention",
            "d_model": 6,
            "n_layers": 1,
            "n_heads": 2,
            "max_seq_len": 13,
        },
        "head": {"kind": "decoding", "d_model": 6, "vocab_size": 11},
    },
    "pathways": {"p": ["embed", "attn_0", "head"]},
}


def _docs(files, name):
    return list(yaml.safe_load_all(files[name]))


def _by_kind(docs):
    return {d["kind"]: d for d in docs}


def test_each_module_gets_deployment_service_hpa_pdb():
    files = render.render(spec_lib.from_dict(SPEC), image_registry="reg.test/pw/")
    assert sorted(f for f in files if f.startswith("modules/")) == [
        "modules/attn-0.yaml",
        "modules/embed.yaml",
        "modules/head.yaml",
    ]
    objs = _by_kind(_docs(files, "modules/attn-0.yaml"))
    assert set(objs) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    dep = objs["Deployment"]
    assert dep["metadata"]["name"] == "attn-0"
    assert dep["metadata"]["labels"] == {
        "app.kubernetes.io/name": "pathways",
        "app.kubernetes.io/component": "module",
        "pathways.dev/module": "attn-0",
    }
    assert dep["metadata"]["annotations"]["pathways.dev/module-name"] == "attn_0"
    assert "replicas" not in dep["spec"]  # owned by kubectl scale / the HPA
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "reg.test/pw/module-server:latest"
    # XLA's pool follows the pod's CPU limit, not the node's CPU count.
    assert c["env"] == [
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
        # Mutual TLS from the module's cert-manager-style Secret, mounted read-only.
        {"name": "PATHWAYS_TLS_DIR", "value": "/var/run/pathways/tls"},
        {"name": "PATHWAYS_TLS_SERVER_NAME", "value": "pathways-module"},
        {"name": "PATHWAYS_PATH_ROOTS", "value": "/training"},  # Save/Load confined there
        {"name": "PATHWAYS_TRAINING", "value": "1"},  # jobs train through module servers
    ]
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "pathways-module-tls"
    assert {"name": "tls", "mountPath": "/var/run/pathways/tls", "readOnly": True} in c[
        "volumeMounts"
    ]
    assert c["args"] == [
        "--checkpoint",
        "/checkpoint",
        "--module",
        "attn_0",
        "--host",
        "0.0.0.0",
        "--port",
        "50051",
        "--grace-s",
        "30",
        "--health-port",
        "50052",
        "--metrics-port",
        "9464",
    ]
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in c["ports"]
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9464"
    # Kubelet's probes cannot speak TLS: a plaintext port answers health only.
    assert c["readinessProbe"]["grpc"] == {"port": 50052, "service": ""}
    assert c["livenessProbe"]["grpc"] == {"port": 50052, "service": ""}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] == 35  # --grace-s 30, plus time to exit
    svc = objs["Service"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["ports"][0]["name"] == "grpc"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert objs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == "attn-0"

    gateway_args = _by_kind(_docs(files, "gateway.yaml"))["Deployment"]["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    # The gateway discovers replicas from the module Services' Endpoints (no fixed addresses).
    i = gateway_args.index("--discover")
    assert gateway_args[i : i + 2] == ["--discover", "k8s"] and "--module" not in gateway_args
    i = gateway_args.index("--metrics-port")
    assert gateway_args[i : i + 2] == ["--metrics-port", "9464"]


def test_adding_a_module_adds_its_deployment_and_nothing_else_changes():
    before = render.render(spec_lib.from_dict(SPEC))
    bigger = copy.deepcopy(SPEC)
    bigger["modules"]["attn-1"] = dict(SPEC["modules"]["attn_0"])
    bigger["pathways"]["deep"] = ["embed", "attn_0", "attn-1", "head"]
    after = render.render(spec_lib.from_dict(bigger))

    assert set(after) - set(before) == {"modules/attn-1.yaml"}
    assert (
        _by_kind(_docs(after, "modules/attn-1.yaml"))["Deployment"]["metadata"]["name"] == "attn-1"
    )
    assert "modules/attn-1.yaml" in yaml.safe_load(after["kustomization.yaml"])["resources"]
    changed = {f for f in before if before[f] != after[f]}
    assert changed == {"kustomization.yaml", "spec.yaml"}


def test_checkpoint_uris():
    spec = spec_lib.from_dict(SPEC)
    files = render.render(spec, checkpoint_uri="pvc://ckpts/runs/7")
    pod = _by_kind(_docs(files, "modules/head.yaml"))["Deployment"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "ckpts", "readOnly": True}
    assert pod["containers"][0]["volumeMounts"][0]["subPath"] == "runs/7"
    files = render.render(spec, checkpoint_uri="file:///data/ckpt")
    pod = _by_kind(_docs(files, "modules/head.yaml"))["Deployment"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["hostPath"]["path"] == "/data/ckpt"
    with pytest.raises(ValueError, match="checkpoint URI must be.*'s3://b/k'"):
        render.render(spec, checkpoint_uri="s3://b/k")


def test_write_removes_modules_dropped_from_the_spec(tmp_path):
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "old.yaml").write_text("stale")
    render.write(render.render(spec_lib.from_dict(SPEC)), tmp_path)
    assert sorted(p.name for p in (tmp_path / "modules").iterdir()) == [
        "attn-0.yaml",
        "embed.yaml",
        "head.yaml",
    ]


def test_no_yaml_anchors():
    files = render.render(spec_lib.from_dict(SPEC))
    assert not any("&id" in text or "*id" in text for text in files.values())


def _pod_spec(files, name, kind="Deployment"):
    return _by_kind(_docs(files, name))[kind]["spec"]["template"]["spec"]


def test_training_output_has_its_own_writable_volume():
    files = render.render(spec_lib.from_dict(SPEC), training_uri="pvc://train/runs")
    for name in ("modules/attn-0.yaml", "coordinator.yaml"):
        pod = _pod_spec(files, name)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        # Module servers save their part of a checkpoint there too (TrainingService.Save).
        assert volumes["training"]["persistentVolumeClaim"] == {"claimName": "train"}
        assert mounts["training"] == {
            "name": "training",
            "mountPath": "/training",
            "subPath": "runs",
        }
        assert mounts["checkpoint"]["readOnly"] is True
        assert volumes["checkpoint"]["persistentVolumeClaim"]["readOnly"] is True
    gateway = _pod_spec(files, "gateway.yaml")
    assert "training" not in {v["name"] for v in gateway["volumes"]}
    default = render.render(spec_lib.from_dict(SPEC))
    claim = {v["name"]: v for v in _pod_spec(default, "coordinator.yaml")["volumes"]}["training"]
    assert claim["persistentVolumeClaim"] == {"claimName": "pathways-training"}
    with pytest.raises(ValueError, match="training URI must be.*'emptydir://'"):
        render.render(spec_lib.from_dict(SPEC), training_uri="emptydir://")


def _pathways_file(files) -> tuple[str, dict, dict]:
    """The gateway's --pathways-file, with the mount and the volume of its directory."""
    pod = _pod_spec(files, "gateway.yaml")
    args = pod["containers"][0]["args"]
    path = args[args.index("--pathways-file") + 1]
    (mount,) = (
        m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == path.rsplit("/", 1)[0]
    )
    (volume,) = (v for v in pod["volumes"] if v["name"] == mount["name"])
    return path, mount, volume


def test_the_gateway_keeps_its_pathway_table_per_checkpoint_on_a_writable_volume():
    spec = spec_lib.from_dict(SPEC)
    path, mount, volume = _pathways_file(render.render(spec))
    assert mount == {"name": "gateway-state", "mountPath": "/var/lib/pathways"}
    assert volume["persistentVolumeClaim"] == {"claimName": "pathways-gateway-state"}
    # The checkpoint is always mounted at /checkpoint: the file is named after its URI, so a
    # rollout to another checkpoint starts from that checkpoint's own spec.
    run_2, _, _ = _pathways_file(render.render(spec, checkpoint_uri="pvc://ckpts/run-2"))
    assert run_2 != path and run_2.endswith(".json")
    assert _pathways_file(render.render(spec, checkpoint_uri="pvc://ckpts/run-2"))[0] == run_2
    _, _, on_node = _pathways_file(render.render(spec, gateway_state_uri="file:///srv/gw"))
    assert on_node["hostPath"]["path"] == "/srv/gw"
    with pytest.raises(ValueError, match="gateway-state URI must be.*'configmap://x'"):
        render.render(spec, gateway_state_uri="configmap://x")  # read-only: no store
    for name in ("modules/attn-0.yaml", "coordinator.yaml", "http-front.yaml"):
        assert "gateway-state" not in {
            v["name"] for v in _pod_spec(render.render(spec), name)["volumes"]
        }


def test_coordinator_gets_the_broker_url_the_worker_reads():
    c = _pod_spec(render.render(spec_lib.from_dict(SPEC)), "coordinator.yaml")["containers"][0]
    # pathways.coordinator.app reads PATHWAYS_BROKER_URL (tests/k8s/workload_env_test.py runs it).
    password = {"secretKeyRef": {"name": "pathways-broker", "key": "password"}}
    assert c["env"][0] == {"name": "PATHWAYS_BROKER_PASSWORD", "valueFrom": password}
    assert c["env"][1] == {"name": "PATHWAYS_BROKER_URL", "value": "redis://pathways-broker:6379/0"}
    assert c["env"][2] == {
        "name": "PATHWAYS_JOB_ROOTS",
        "value": "/training:/checkpoint:/etc/pathways",
    }
    # Its certificate is its client certificate at the module servers.
    assert {"name": "PATHWAYS_TLS_DIR", "value": "/var/run/pathways/tls"} in c["env"]


def test_network_policies_admit_the_traffic_of_training_and_serving():
    policies = {
        d["metadata"]["name"]: d["spec"]
        for d in _docs(render.render(spec_lib.from_dict(SPEC)), "network-policies.yaml")
    }

    def sources(name):
        rule = policies[name]["ingress"][0]
        (peer,) = rule["from"]
        (port,) = rule["ports"]
        (component,) = (
            e["values"]
            for e in peer["podSelector"]["matchExpressions"]
            if e["key"] == "app.kubernetes.io/component"
        )
        return set(component), port["port"]

    # Modules send activations and gradients to each other when a job trains through them.
    assert sources("pathways-modules") == ({"gateway", "coordinator", "module"}, 50051)
    assert sources("pathways-broker") == ({"coordinator"}, 6379)
    # Prometheus (pods labelled app.kubernetes.io/name=prometheus, any namespace) scrapes the
    # modules' metrics port; the broker has no metrics.
    (scrape,) = policies["pathways-modules"]["ingress"][1:]
    assert scrape["from"] == [
        {
            "namespaceSelector": {},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    assert scrape["ports"] == [{"protocol": "TCP", "port": 9464}]
    assert len(policies["pathways-broker"]["ingress"]) == 1


def test_http_front_is_a_client_of_the_gateway_service():
    objs = _by_kind(_docs(render.render(spec_lib.from_dict(SPEC)), "http-front.yaml"))
    c = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:2] == ["--gateway", "pathways-gateway:50051"]
    assert c["env"] == [{"name": "PATHWAYS_TLS_DIR", "value": "/var/run/pathways/tls"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert objs["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert objs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == (
        "pathways-http-front"
    )
    assert objs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def _two_layers() -> dict:
    spec = copy.deepcopy(SPEC)
    spec["modules"]["attn_1"] = dict(spec["modules"]["attn_0"])
    spec["pathways"] = {"p": ["embed", "attn_0", "attn_1", "head"], "q": ["embed", "head"]}
    return spec


def test_colocated_modules_are_one_deployment_named_after_the_group():
    spec = spec_lib.from_dict(_two_layers())
    files = render.render(spec, colocate=[["attn_0", "attn_1"]])
    assert sorted(f for f in files if f.startswith("modules/")) == [
        "modules/attn-0-attn-1.yaml",
        "modules/embed.yaml",
        "modules/head.yaml",
    ]
    objs = _by_kind(_docs(files, "modules/attn-0-attn-1.yaml"))
    assert set(objs) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    dep = objs["Deployment"]
    assert dep["metadata"]["name"] == objs["Service"]["metadata"]["name"] == "attn-0-attn-1"
    assert dep["metadata"]["annotations"]["pathways.dev/module-name"] == "attn_0+attn_1"
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][c["args"].index("--module") + 1] == "attn_0,attn_1"
    env = {e["name"] for e in c["env"]}
    assert "PATHWAYS_TRAINING" not in env  # a chain server only serves
    assert c["resources"] == render.module_objs.RESOURCES_WITH_CACHE
    # a module alone still trains through its server
    alone = _pod_spec(files, "modules/embed.yaml")["containers"][0]
    assert "PATHWAYS_TRAINING" in {e["name"] for e in alone["env"]}
    gw = _pod_spec(files, "gateway.yaml")["containers"][0]["args"]
    assert gw[gw.index("--colocate") + 1] == "attn_0,attn_1"
    assert (
        "--colocate" not in _pod_spec(render.render(spec), "gateway.yaml")["containers"][0]["args"]
    )


@pytest.mark.parametrize(
    "colocate, words",
    [
        ([["attn_1", "attn_0"]], "'attn_1,attn_0' are not consecutive modules of any pathway"),
        ([["attn_0", "nope"]], "colocate: unknown module 'nope'"),
        ([["attn_0"]], "colocate: a group names 2 or more modules"),
    ],
)
def test_bad_colocate_groups_are_refused_naming_them(colocate, words):
    with pytest.raises(ValueError, match=words):
        render.render(spec_lib.from_dict(_two_layers()), colocate=colocate)


def test_colocated_modules_need_one_placement():
    data = _two_layers()
    data["placement"] = {"attn_0": {"accelerator": "nvidia.com/gpu", "count": 1}}
    with pytest.raises(ValueError, match="run in one pod and need one placement"):
        render.render(spec_lib.from_dict(data), colocate=[["attn_0", "attn_1"]])
