"""Renders a kustomize base for any pathway spec: one Deployment (+ Service, HPA, PDB) per module,
plus the gateway, coordinator workers, broker, spec ConfigMap, RBAC and network policies."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pathways.deploy.local import server_names
from pathways.k8s import modules as module_objs
from pathways.k8s import names, platform, pods
from pathways.modules import registry as kinds
from pathways.spec import PathwaySpec

DEFAULT_REGISTRY = "registry.example.com/pathways"
DEFAULT_NAMESPACE = "pathways"
IMAGES = {
    "module": "module-server",
    "gateway": "gateway",
    "coordinator": "coordinator",
    "http_front": "http-front",
}


class _Dumper(yaml.SafeDumper):
    """Block-style YAML without anchors (objects share label dicts; manifests must not alias)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False) for o in objects)


def render(
    spec: PathwaySpec,
    checkpoint_uri: str = pods.DEFAULT_CHECKPOINT_URI,
    image_registry: str = DEFAULT_REGISTRY,
    namespace: str = DEFAULT_NAMESPACE,
    training_uri: str = pods.DEFAULT_TRAINING_URI,
    gateway_state_uri: str = pods.DEFAULT_GATEWAY_STATE_URI,
    colocate: Sequence[Sequence[str]] = (),
) -> dict[str, str]:
    """The kustomize base for `spec`, as {relative filename: YAML text}.

    Args:
      spec: the pathway spec; each module becomes a Deployment named after it (DNS-sanitised).
      checkpoint_uri: `pvc://CLAIM[/SUBPATH]` or `file:///PATH`, mounted read-only at /checkpoint.
      image_registry: prefix of the `module-server`, `gateway`, `coordinator` and `http-front`
        images (tag `latest`; overlays set real tags with kustomize `images:`).
      namespace: set on every object by the kustomization.
      training_uri: `pvc://CLAIM[/SUBPATH]` or `file:///PATH`, mounted read-write at /training
        in the coordinator and module pods, which write training jobs' output there.
      gateway_state_uri: `pvc://CLAIM[/SUBPATH]` or `file:///PATH`, mounted read-write in the
        gateway, which keeps its pathway table's runtime changes there (`--pathways-file`, one
        file per checkpoint URI). A volume for one writer: one gateway replica.
      colocate: groups of consecutive modules of a pathway that one server hosts and steps as
        one program (`pathways up --colocate`): one Deployment, Service and HPA per group, named
        after it ("attn-0+attn-1" -> attn-0-attn-1), scaled as one; the gateway is told the
        groups (a step through a group is one call). Such a server only serves: pipeline
        training through the services needs the modules on servers of their own.

    Raises:
      ValueError: a bad checkpoint, training or gateway state URI, or module names that clash
        once sanitised.
    """
    pods.checkpoint_volume(checkpoint_uri)  # fail early, with the URI in the message
    pods.training_volume(training_uri)
    pods.gateway_state_volume(gateway_state_uri)
    groups = [[m.strip() for m in g] for g in colocate]
    servers = server_names(spec, list(spec.modules), groups)  # checks the groups
    dns = names.module_names([s.replace(",", "+") for s in servers])
    registry = image_registry.rstrip("/")
    image = {role: f"{registry}/{name}:latest" for role, name in IMAGES.items()}

    files: dict[str, str] = {}
    for server in servers:
        hosted = server.split(",")
        objs = module_objs.module_objects(
            server,
            _kind([spec.modules[m] for m in hosted]),
            image["module"],
            checkpoint_uri,
            training_uri,
            placement=_placement(spec, hosted),
        )
        files[f"modules/{dns[server.replace(',', '+')]}.yaml"] = to_yaml(objs)
    files["gateway.yaml"] = to_yaml(
        platform.gateway(
            image["gateway"], checkpoint_uri, gateway_state_uri, [",".join(g) for g in groups]
        )
    )
    files["http-front.yaml"] = to_yaml(platform.http_front(image["http_front"]))
    files["coordinator.yaml"] = to_yaml(
        platform.coordinator(image["coordinator"], checkpoint_uri, training_uri)
    )
    files["broker.yaml"] = to_yaml(platform.broker())
    files["rbac.yaml"] = to_yaml(platform.rbac())
    files["network-policies.yaml"] = to_yaml(platform.network_policies())
    files["namespace.yaml"] = to_yaml(
        [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}]
    )
    files["spec.yaml"] = yaml.dump(spec.to_dict(), Dumper=_Dumper, sort_keys=False)

    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "labels": [{"pairs": {"app.kubernetes.io/part-of": names.APP}, "includeSelectors": False}],
        "resources": [
            "namespace.yaml",
            "rbac.yaml",
            "network-policies.yaml",
            "broker.yaml",
            "gateway.yaml",
            "http-front.yaml",
            "coordinator.yaml",
            *sorted(f for f in files if f.startswith("modules/")),
        ],
        # A generated ConfigMap gets a content-hash suffix, so editing the spec rolls every pod.
        "configMapGenerator": [
            {
                "name": pods.SPEC_CONFIGMAP,
                "files": ["spec.yaml"],
                "options": {"labels": {names.APP_LABEL: names.APP}},  # read by every component
            }
        ],
    }
    header = (
        "# Generated by `pathways k8s render`; edit the spec and re-render rather than "
        "editing by hand.\n"
    )
    files["kustomization.yaml"] = header + yaml.dump(kustomization, Dumper=_Dumper, sort_keys=False)
    return dict(sorted(files.items()))


def _kind(configs):
    """The kind of a server hosting `configs` (one module: its own; a chain: a cache when any
    module keeps one, a head when the last is)."""
    if len(configs) == 1:
        return kinds.of(configs[0])
    from pathways.serving.chain import ChainKind

    return ChainKind(
        "chain",
        is_head=kinds.of(configs[-1]).is_head,
        has_cache=any(kinds.of(c).has_cache for c in configs),
    )


def _placement(spec: PathwaySpec, hosted: list[str]):
    """The placement of a server hosting `hosted`: theirs, which must be one and the same."""
    placed = [spec.placement.get(m) for m in hosted]
    if any(p != placed[0] for p in placed):
        shown = ", ".join(f"{m}: {spec.placement.get(m)}" for m in hosted)
        raise ValueError(
            f"colocate: {','.join(hosted)} run in one pod and need one placement; got {shown}"
        )
    return placed[0]


def write(files: dict[str, str], out: str | Path) -> list[Path]:
    """Writes rendered files under `out`, removing stale module files from an earlier render."""
    out = Path(out)
    stale = set((out / "modules").glob("*.yaml")) if (out / "modules").is_dir() else set()
    written = []
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        stale.discard(path)
        written.append(path)
    for path in stale:
        path.unlink()
    return written
