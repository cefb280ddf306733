"""Fuzzing every RPC of a real deployment (issue 17): module servers with TrainingService, a
gateway and health, started by this file (tools/bench/fuzz.py holds the strategies and checks).

Each call must get a status within its deadline that is not a server fault (INTERNAL, UNKNOWN),
no server may die, each module server's resident memory stays under its budget + 10 % and health
stays SERVING. CI runs 2,000 calls; `tools/bench/fuzz.py --calls 20000` runs more."""

from __future__ import annotations

import pytest

from tools.bench import fuzz

pytestmark = pytest.mark.slow
CALLS = 2000


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with fuzz.deployment(tmp_path_factory.mktemp("fuzz")) as t:
        yield t


def test_every_rpc_answers_random_and_adversarial_requests(target):
    fuzz.fuzz(target, CALLS, check_every=250)
    s = fuzz.summary(target)
    assert s["calls"] >= CALLS
    # Every RPC of every service was called, and each answered more than errors: the fuzzing
    # reaches the real paths (a session opened, a prefill run, a generation streamed).
    rpcs = set(s["per_rpc"])
    for name in ("Describe", "OpenSession", "Prefill", "Decode", "DecodeStream", "CloseSession",
                 "Forward", "TrainConfigure", "TrainForward", "TrainBackward", "Steps", "RunStep",
                 "Deliver", "Apply", "Evaluate", "Save", "Load", "Reset", "Generate",
                 "ListPathways", "AddModule", "SetPathway", "RemovePathway", "Infer",
                 "Publish", "GatewayPublish", "HealthCheck"):  # fmt: skip
        assert name in rpcs, name
    for name in ("OpenSession", "Prefill", "Generate", "HealthCheck", "TrainConfigure"):
        assert s["per_rpc"][name].get("OK", 0) > 0, (name, s["per_rpc"][name])
    print(s)
