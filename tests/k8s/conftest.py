"""Fixtures for the Kubernetes tests: a real v1.20 control plane from the shared k8s-local kit."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.k8s.kube import wait_for


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


def _kit() -> Path:
    shared = os.environ.get("PATHWAYS_SHARED_DIR")
    if not shared:
        pytest.skip("PATHWAYS_SHARED_DIR is unset: no local Kubernetes kit (shared/k8s-local)")
    kit = Path(shared) / "k8s-local"
    if not (kit / "up.sh").is_file():
        pytest.skip(f"no Kubernetes kit at {kit} (PATHWAYS_SHARED_DIR={shared})")
    return kit


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory) -> str:
    """A real Kubernetes v1.20 API server (+ controllers, scheduler, stand-in kubelet) on loopback,
    on free ports; torn down after the session."""
    kit = _kit()
    if subprocess.run(["which", "kubectl"], capture_output=True).returncode != 0:
        pytest.skip("kubectl is not installed")
    run_dir = tmp_path_factory.mktemp("k8s-local")
    env = {
        **os.environ,
        "RUN_DIR": str(run_dir),
        "API_PORT": str(_free_port()),
        "ETCD_PORT": str(_free_port_run(3)),
    }
    kubelet = None
    try:
        up = subprocess.run(
            [str(kit / "up.sh")], env=env, capture_output=True, text=True, timeout=300
        )
        if up.returncode != 0:
            pytest.fail(f"k8s-local up.sh failed:\n{up.stdout}\n{up.stderr}")
        path = str(run_dir / "kubeconfig")
        log = open(run_dir / "kubelet.log", "w")
        kubelet = subprocess.Popen(
            [sys.executable, str(kit / "fake_kubelet.py"), "node-1"],
            env={**env, "KUBECONFIG": path},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for(
            lambda: b"node-1"
            in subprocess.run(
                ["kubectl", "--kubeconfig", path, "get", "nodes", "-o", "name"], capture_output=True
            ).stdout,
            30,
            "stand-in kubelet to register node-1",
        )
        yield path
    finally:
        if kubelet is not None:
            kubelet.terminate()
            kubelet.wait(timeout=10)
        subprocess.run([str(kit / "down.sh")], env=env, capture_output=True)
