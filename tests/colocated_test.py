"""Co-located modules: a module server hosting several consecutive modules of a pathway steps
them as one program (`--module attn-0,attn-1`), and the remote executor makes one call to it
where it would make one per module. Against the local executor, and its bad uses. The servers
are a local deployment (`pathways up --colocate attn-0,attn-1`), its gateway included."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from pathways import codec
from pathways import generate as gen
from pathways.deploy import launcher
from pathways.deploy import local as local_dep
from pathways.deploy.local import LocalDeployment
from pathways.executor.remote import RemoteExecutor
from pathways.executor.replicas import StaticReplicaSource
from pathways.sampling import SamplingParams
from pathways.serving import testing
from pathways.tokenizers import ByteTokenizer
from pathways.v1 import module_pb2, module_pb2_grpc
from services.module_server import main as module_server

pytestmark = pytest.mark.slow
TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"
IDS = list(b"def main():")
N = 16


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """`up --colocate attn-0,attn-1` (plaintext, no coordinator): embed | attn-0,attn-1 (one
    server) | head and a gateway, the others started with --training as `up` does."""
    d = tmp_path_factory.mktemp("ckpt")
    local = testing.make_checkpoint(d)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATHWAYS_HOME", str(tmp_path_factory.mktemp("home")))
        dep = LocalDeployment(str(d), coordinator=False, colocate=[["attn-0", "attn-1"]])
        with dep:
            yield dep, local


@pytest.fixture(scope="module")
def fleet(deployment):
    """The deployment's servers, and the whole tiny pathway on one more server."""
    dep, local = deployment
    f, name = dep.fleet, "embed,attn-0,attn-1,head"
    whole = launcher.start_module(f.checkpoint, name, f.server_env(4), None, f.server_args(name))
    try:
        launcher.wait_healthy(whole.address, whole.proc, 300)
        yield f, whole, local
    finally:
        whole.stop()


def stub(address):
    return module_pb2_grpc.ModuleServiceStub(grpc.insecure_channel(address))


def test_a_chain_server_describes_its_modules(fleet):
    f, whole, _ = fleet
    d = stub(f.endpoints["attn-0"][0]).Describe(module_pb2.DescribeRequest(), timeout=10)
    assert list(d.modules) == ["attn-0", "attn-1"] and d.name == "attn-0+attn-1"
    assert (d.input_kind, d.output_kind) == ("hidden", "hidden")
    d = stub(whole.address).Describe(module_pb2.DescribeRequest(), timeout=10)
    assert list(d.modules) == ["embed", "attn-0", "attn-1", "head"]
    assert (d.input_kind, d.output_kind) == ("tokens", "logits")


def test_generation_through_chains_equals_local(fleet):
    f, whole, local = fleet
    endpoints = {m: [whole.address] for m in local.spec.modules}
    for eps, hops in ((f.endpoints, 3), (endpoints, 1)):
        ex = RemoteExecutor(local.spec, eps)
        try:
            assert len(ex._hops(local.spec.pathway("tiny").modules)) == hops
            np.testing.assert_array_equal(
                gen.greedy_ids(ex, "tiny", IDS, N), gen.greedy_ids(local, "tiny", IDS, N)
            )
            # Sampled rows (own seeds) and logits, two rows in one session.
            params = [SamplingParams(temperature=0.8, seed=3), SamplingParams()]
            out = []
            for e in (ex, local):
                s = e.open_session("tiny", params)
                try:
                    r = e.prefill(s, [IDS, IDS[:5]], return_logits=True)
                    toks, logits = [r.tokens], [r.logits]
                    for _ in range(6):
                        r = e.decode(s, toks[-1], return_logits=True)
                        toks.append(r.tokens)
                        logits.append(r.logits)
                finally:
                    e.close_session(s)
                out.append((np.stack(toks), np.stack(logits)))
            np.testing.assert_array_equal(out[0][0], out[1][0])
            np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-4, atol=1e-4)
            # Stateless forward: logits, and hidden states from the first modules of a chain.
            x = np.array([IDS], np.int32)
            for head in (True, False):
                np.testing.assert_allclose(
                    ex.forward("tiny", x, head=head),
                    local.forward("tiny", x, head=head),
                    rtol=1e-4,
                    atol=1e-4,
                )
        finally:
            ex.close()


def test_a_replica_source_listing_a_group_under_its_server_name(fleet):
    """What Kubernetes discovery gives (`pathways k8s render --colocate`: one Service per group,
    watched as "attn-0+attn-1"): the executor told the groups makes one call per group, and a
    module of a group has its server's replicas (Publish reaches them)."""
    f, _, local = fleet
    servers = {"embed": f.endpoints["embed"], "head": f.endpoints["head"]}
    servers["attn-0+attn-1"] = f.endpoints["attn-0"]
    ex = RemoteExecutor(local.spec, StaticReplicaSource(servers), colocated=[["attn-0", "attn-1"]])
    try:
        hops = ex._hops(local.spec.pathway("tiny").modules)
        assert [h for h, _ in hops] == ["embed", "attn-0+attn-1", "head"]
        assert ex.replicas["attn-1"].source.replicas("attn-1") == f.endpoints["attn-0"]
        np.testing.assert_array_equal(
            gen.greedy_ids(ex, "tiny", IDS, N), gen.greedy_ids(local, "tiny", IDS, N)
        )
    finally:
        ex.close()
    with pytest.raises(ValueError, match="colocated groups go with a ReplicaSource"):
        RemoteExecutor(local.spec, f.endpoints, colocated=[["attn-0", "attn-1"]])


def test_concurrent_sessions_batch_through_a_chain(fleet):
    """Several sessions' decode steps in one batch at the chain server, token for token."""
    import threading

    f, whole, local = fleet
    ex = RemoteExecutor(local.spec, {m: [whole.address] for m in local.spec.modules})
    prompts = [IDS, IDS[:4], list(b"x = 1"), list(b"import os")]
    got: dict[int, list[int]] = {}
    try:

        def run(i, prompt):
            got[i] = gen.greedy_ids(ex, "tiny", prompt, N)

        threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        ex.close()
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(got[i], gen.greedy_ids(local, "tiny", p, N))


def test_a_pathway_using_part_of_a_chain_is_refused_by_name(fleet):
    f, _, local = fleet
    # tiny-shallow steps attn-0 alone, which this deployment hosts only chained to attn-1.
    ex = RemoteExecutor(local.spec, f.endpoints)
    try:
        with pytest.raises(Exception, match=r"attn-0.*attn-1"):
            gen.greedy_ids(ex, "tiny-shallow", IDS, 2)
    finally:
        ex.close()
    s = stub(f.endpoints["attn-0"][0])
    with pytest.raises(grpc.RpcError) as e:
        s.OpenSession(module_pb2.OpenSessionRequest(batch_size=1, modules=["attn-1"]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "['attn-0', 'attn-1']" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        s.Forward(
            module_pb2.ForwardRequest(
                input=codec.encode(np.zeros((1, 2, 128), np.float32)), modules=["attn-1"]
            ),
            timeout=10,
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "modules, message",
    [
        ("head,embed", "'head' is a decoding head"),
        ("embed,attn-1,attn-0,head,", "several consecutive ones"),
        ("embed,nope", "unknown module 'nope'"),
    ],
)
def test_a_chain_that_cannot_run_is_refused_at_start(fleet, capsys, modules, message):
    f, _, _ = fleet
    rc = module_server.main(["--checkpoint", f.checkpoint, "--module", modules, "--insecure"])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_up_colocate_serves_through_the_gateway_and_does_not_train_the_chain(deployment, capsys):
    """The gateway reaches attn-0 and attn-1 as one hop; `train --remote` against this
    deployment is refused by name (the chain server only serves), before any job is sent."""
    from pathways.v1 import gateway_pb2, gateway_pb2_grpc
    from tools.cli.main import main

    dep, local = deployment
    assert dep.servers == ["embed", "attn-0,attn-1", "head"]
    assert set(dep.train_modules) == {"embed", "head"}
    assert dep.fleet.endpoints["attn-0"] == dep.fleet.endpoints["attn-1"]
    gw = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(dep.gateway))
    sampling = gateway_pb2.SamplingOptions(temperature=0, max_new_tokens=N)
    prompt = "def main():"
    req = gateway_pb2.GenerateRequest(pathway="tiny", prompt=prompt, sampling=sampling)
    ids = [r.token_id for r in gw.Generate(req, timeout=120) if r.token_id >= 0]
    want = gen.greedy_ids(local, "tiny", ByteTokenizer().encode(prompt), N)
    np.testing.assert_array_equal(ids, want)

    assert local_dep.read()["serve_only"] == ["attn-0", "attn-1"]
    argv = ["train", "--remote", "--spec", str(TINY), "--out", dep.checkpoint + "-out"]
    assert main([*argv, "--broker", "redis://127.0.0.1:1"]) != 0
    err = capsys.readouterr().err
    assert "attn-0, attn-1" in err and "--engine pipeline" in err, err


@pytest.mark.parametrize(
    "colocate, message",
    [
        ([["attn-0"]], "2 or more modules"),
        ([["attn-1", "attn-0"]], "not consecutive modules of any pathway"),
        ([["attn-0", "attn-1"], ["attn-1", "head"]], "'attn-1' is in two groups"),
        ([["attn-0", "nope"]], "unknown module 'nope'"),
        ([["head", "embed"]], "not consecutive"),
    ],
)
def test_bad_colocate_groups_are_refused_before_anything_starts(deployment, colocate, message):
    dep, _ = deployment
    with pytest.raises(ValueError, match=message):
        LocalDeployment(dep.checkpoint, coordinator=False, colocate=colocate)
    with pytest.raises(ValueError, match="name the group 'attn-0,attn-1'"):
        LocalDeployment(
            dep.checkpoint, {"attn-0": 2}, coordinator=False, colocate=[["attn-0", "attn-1"]]
        )
