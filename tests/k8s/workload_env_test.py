"""Offline: every rendered Pathways container starts with the environment its manifest gives it.

Each container's own entry point runs (in this process, up to the end of its start-up; see
tests/k8s/entrypoints.py) with the container's args and env; every env variable the manifest sets
must be one the code reads, and the process must get through start-up (a required variable, such
as the coordinator's broker URL, is set and parses). live_test.py repeats this on the objects the
API server stored.
"""

from __future__ import annotations

import copy
import math

import pytest

from tests.k8s import entrypoints
from tests.k8s.kube import REPO, kustomize

OVERLAYS = sorted(p.name for p in (REPO / "k8s" / "overlays").iterdir() if p.is_dir())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_env_is_what_the_code_reads(overlay):
    docs = kustomize(REPO / "k8s" / "overlays" / overlay)
    started = entrypoints.check_workloads(docs)
    modules = {"embed", "attn-0", "attn-1", "head"}
    assert set(started) == modules | {
        "pathways-gateway",
        "pathways-coordinator",
        "pathways-http-front",
    }
    # The HTTP front dials the gateway's Service on its gRPC port.
    (front_args,) = started["pathways-http-front"].args
    assert front_args.gateway == "pathways-gateway:50051" and not front_args.insecure
    # The broker's password (a stand-in for the Secret's value) joins its URL.
    assert started["pathways-coordinator"].broker_url == (
        "redis://:secret-pathways-broker-password@pathways-broker:6379/0"
    )
    assert "PATHWAYS_BROKER_URL" in started["pathways-coordinator"].reads
    # The CPU limit, rounded up, becomes the module server's XLA thread count.
    for d in docs:
        if d["metadata"]["name"] in modules and d["kind"] == "Deployment":
            limit = d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
            threads = started[d["metadata"]["name"]].args[0].cpu_threads
            assert threads == math.ceil(entrypoints.cpu_cores(limit)), (limit, threads)


def _coordinator() -> dict:
    docs = kustomize(REPO / "k8s" / "overlays" / "dev")
    (d,) = (d for d in docs if d["metadata"]["name"] == "pathways-coordinator")
    return d["spec"]["template"]["spec"]["containers"][0]


def test_a_broker_url_under_another_name_is_caught():
    """The coordinator once got CELERY_BROKER_URL, which the worker never reads: it exited."""
    c = copy.deepcopy(_coordinator())
    for e in c["env"]:
        if e["name"] == "PATHWAYS_BROKER_URL":
            e["name"] = "CELERY_BROKER_URL"
    with pytest.raises(AssertionError, match="would exit at start: .*PATHWAYS_BROKER_URL"):
        entrypoints.start(c, "pathways-dev")


def test_an_unread_variable_is_caught():
    c = copy.deepcopy(_coordinator())
    c["env"].append({"name": "PATHWAYS_SPEC", "value": "/etc/pathways/spec.yaml"})
    doc = {
        "kind": "Deployment",
        "metadata": {"name": "pathways-coordinator", "namespace": "pathways-dev"},
        "spec": {"template": {"spec": {"containers": [c]}}},
    }
    with pytest.raises(AssertionError, match="sets PATHWAYS_SPEC, which .* does not read"):
        entrypoints.check_workloads([doc])
