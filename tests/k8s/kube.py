"""Helpers for the Kubernetes tests: kustomize, the v1.20 subset of the manifests, polling."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

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
