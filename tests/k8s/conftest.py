"""Fixtures for the Kubernetes tests: a real v1.20 control plane from the shared k8s-local kit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.k8s.kube import control_plane, kit, wait_for


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory) -> str:
    """A real Kubernetes v1.20 API server (+ controllers, scheduler, stand-in kubelet) on loopback,
    on free ports; torn down after the session."""
    kit()  # skips before creating any folder when the kit is absent
    run_dir = tmp_path_factory.mktemp("k8s-local")
    with control_plane(run_dir) as (path, env):
        log = open(run_dir / "kubelet.log", "w")
        kubelet = subprocess.Popen(
            [sys.executable, str(kit() / "fake_kubelet.py"), "node-1"],
            env={**env, "KUBECONFIG": path},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(
                lambda: b"node-1"
                in subprocess.run(
                    ["kubectl", "--kubeconfig", path, "get", "nodes", "-o", "name"],
                    capture_output=True,
                ).stdout,
                30,
                "stand-in kubelet to register node-1",
            )
            yield path
        finally:
            kubelet.terminate()
            kubelet.wait(timeout=10)
            log.close()
