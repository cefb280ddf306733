"""Helpers for the Kubernetes tests: the local control plane, kustomize, the v1.20 subset of the
manifests, polling."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# Kinds that only exist in newer Kubernetes than the kit's v1.20 (validated offline instead).
NEWER_KINDS = {"HorizontalPodAutoscaler", "PodDisruptionBudget"}


def kustomize(directory: Path | str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def for_v1_20(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The manifests a v1.20 API server accepts: without autoscaling/v2 and policy/v1 kinds, and
    without native gRPC probes (GA in 1.27; 1.20 drops the unknown field and then rejects a probe
    with no handler). Both are checked against 1.30 schemas offline."""
    out = []
    for doc in docs:
        if doc["kind"] in NEWER_KINDS:
            continue
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("containers", []):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "grpc" in c.get(probe, {}):
                    del c[probe]
        out.append(doc)
    return out


def wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_run(n: int) -> int:
    """A base port with `n` consecutive free ports (etcd uses client, peer and metrics ports)."""
    for _ in range(100):
        base = random.randint(20000, 40000)
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range for etcd")


def kit() -> Path:
    """The shared k8s-local kit; skips the test (with the reason) when it or kubectl is absent."""
    shared = os.environ.get("PATHWAYS_SHARED_DIR")
    if not shared:
        pytest.skip("PATHWAYS_SHARED_DIR is unset: no local Kubernetes kit (shared/k8s-local)")
    path = Path(shared) / "k8s-local"
    if not (path / "up.sh").is_file():
        pytest.skip(f"no Kubernetes kit at {path} (PATHWAYS_SHARED_DIR={shared})")
    if subprocess.run(["which", "kubectl"], capture_output=True).returncode != 0:
        pytest.skip("kubectl is not installed")
    return path


@contextlib.contextmanager
def control_plane(run_dir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real Kubernetes v1.20 control plane (etcd, API server, controller manager, scheduler; no
    kubelet) on free loopback ports: yields (kubeconfig path, the kit's environment); torn down
    on exit."""
    path = kit()
    env = {
        **os.environ,
        "RUN_DIR": str(run_dir),
        "API_PORT": str(_free_port()),
        "ETCD_PORT": str(_free_port_run(3)),
    }
    try:
        up = subprocess.run(
            [str(path / "up.sh")], env=env, capture_output=True, text=True, timeout=300
        )
        if up.returncode != 0:
            pytest.fail(f"k8s-local up.sh failed:\n{up.stdout}\n{up.stderr}")
        kubeconfig = str(run_dir / "kubeconfig")
        # up.sh returns once the API server is ready; the controller manager starts beside it and,
        # on a loaded machine, takes a while to sync its informers and run its controllers (volume
        # binding, ReplicaSets). Its service-account controller creating `default` in the default
        # namespace says it runs.
        wait_for(
            lambda: subprocess.run(
                ["kubectl", "--kubeconfig", kubeconfig, "get", "serviceaccount", "default"],
                capture_output=True,
            ).returncode
            == 0,
            120,
            "the controller manager to run (serviceaccount/default in namespace default)",
        )
        yield kubeconfig, env
    finally:
        subprocess.run([str(path / "down.sh")], env=env, capture_output=True)
