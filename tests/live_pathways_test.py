"""Pathway surgery on a running deployment: modules added, pathways changed under live traffic."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from pathways import checkpoint as ckpt
from pathways import generate as gen
from pathways import surgery
from pathways.deploy.local import LocalDeployment
from pathways.executor.local import LocalExecutor
from pathways.pipeline.client import remote_stages
from pathways.sampling import SamplingParams
from pathways.serving.testing import make_checkpoint
from pathways.tokenizers import ByteTokenizer
from pathways.train import PipelineEngine, TrainConfig
from pathways.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.slow
TOK = ByteTokenizer()


def local_text(ex, pathway: str, prompt: str, n: int) -> str:
    return gen.generate(ex, pathway, [prompt], TOK, SamplingParams(max_new_tokens=n))[0].text


def stream(stub, pathway: str, prompt: str, n: int) -> str:
    req = gateway_pb2.GenerateRequest(
        pathway=pathway, prompt=prompt, sampling=gateway_pb2.SamplingOptions(max_new_tokens=n)
    )
    return "".join(ev.text for ev in stub.Generate(req, timeout=120))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    make_checkpoint(base)
    with LocalDeployment(base, coordinator=False) as dep:
        yield dep, base


def test_insert_switch_train_and_remove_under_live_traffic(deployment, tmp_path):
    dep, base = deployment
    spec, _ = ckpt.load_spec(base)
    local = LocalExecutor(spec)
    for m in spec.modules:
        local.set_state(m, ckpt.load_module(base, m, local.state(m)))
    want_tiny = local_text(local, "tiny", "def ", 24)
    want_shallow = local_text(local, "tiny-shallow", "def ", 60)

    channel = grpc.insecure_channel(dep.gateway)
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    failures, done, served = [], threading.Event(), [0]

    def traffic():  # steady requests on an untouched pathway: none may fail
        while not done.is_set():
            try:
                assert stream(stub, "tiny", "def ", 24) == want_tiny
                served[0] += 1
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                failures.append(repr(e))

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        # 1. A new attention module, function-preserving, in its own new service.
        grown, state = surgery.insert_attention(spec, "tiny", "attn-new", 2)
        new_ckpt = tmp_path / "grown"
        ckpt.save_spec(new_ckpt, grown, TOK)
        ckpt.save_module(new_ckpt, "attn-new", state)
        address = dep.add_module(new_ckpt, "attn-new")
        assert (
            stub.AddModule(
                gateway_pb2.AddModuleRequest(name="attn-new", addresses=[address]), timeout=30
            ).kind
            == "attention"
        )
        chain = list(grown.pathway("tiny").modules)
        assert chain == ["embed", "attn-0", "attn-new", "attn-1", "head"]
        stub.SetPathway(gateway_pb2.SetPathwayRequest(name="tiny-grown", modules=chain), timeout=10)
        assert stream(stub, "tiny-grown", "def ", 24) == want_tiny  # identical function

        # 2. Change a pathway while long generations stream on it: they finish on the old one.
        results: list[str] = []
        started = [threading.Event() for _ in range(2)]

        def long_stream(ev: threading.Event) -> None:
            req = gateway_pb2.GenerateRequest(
                pathway="tiny-shallow",
                prompt="def ",
                sampling=gateway_pb2.SamplingOptions(max_new_tokens=60),
            )
            text = ""
            for msg in stub.Generate(req, timeout=120):
                ev.set()  # its session is open: the pathway change must not affect it
                text += msg.text
            results.append(text)

        long = [threading.Thread(target=long_stream, args=(ev,)) for ev in started]
        for t in long:
            t.start()
        assert all(ev.wait(60) for ev in started)
        stub.SetPathway(
            gateway_pb2.SetPathwayRequest(name="tiny-shallow", modules=["embed", "attn-1", "head"]),
            timeout=10,
        )
        for t in long:
            t.join(120)
        assert results == [want_shallow, want_shallow]
        changed = spec.with_pathway("tiny-shallow", ["embed", "attn-1", "head"])
        want_changed = local_text(
            LocalExecutor(changed, states={m: local.state(m) for m in spec.modules}),
            "tiny-shallow",
            "def ",
            24,
        )
        assert stream(stub, "tiny-shallow", "def ", 24) == want_changed

        # 3. Train only the new module, through the services; the others stay frozen.
        cfg = TrainConfig(steps=10, warmup=1, lr=1e-2)
        addresses = {m: a[0] for m, a in dep.fleet.endpoints.items()}
        stages = remote_stages(
            grown, "tiny", addresses, cfg, frozen={m for m in chain if m != "attn-new"}
        )
        engine = PipelineEngine(stages, n_micro=2)
        toks = np.random.default_rng(0).integers(0, 257, (4, 33)).astype(np.int32)
        before = engine.eval_loss(toks[:, :-1], toks[:, 1:])
        for _ in range(6):
            engine.step(toks[:, :-1], toks[:, 1:])
        after = engine.eval_loss(toks[:, :-1], toks[:, 1:])
        engine.close()
        assert after < before - 0.05, (before, after)
        # The frozen modules did not move: the untouched pathway still generates as before.
        assert stream(stub, "tiny", "def ", 24) == want_tiny

        # 4. Remove the grown pathway; contract errors name the modules.
        stub.RemovePathway(gateway_pb2.RemovePathwayRequest(name="tiny-grown"), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            stream(stub, "tiny-grown", "def ", 4)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            stub.SetPathway(
                gateway_pb2.SetPathwayRequest(name="bad", modules=["attn-0", "head"]), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must start with an embedding module" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.SetPathway(
                gateway_pb2.SetPathwayRequest(name="bad", modules=["embed", "nope"]), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # Names that could leave a checkpoint directory are refused before anything is dialed.
        for call, req in [
            (stub.AddModule, gateway_pb2.AddModuleRequest(name="../x", addresses=["10.0.0.1:1"])),
            (stub.SetPathway, gateway_pb2.SetPathwayRequest(name="a/b", modules=["embed", "head"])),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                call(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "name must match" in e.value.details(), e.value.details()
    finally:
        done.set()
        for t in threads:
            t.join(120)
        channel.close()
    assert failures == []
    assert served[0] >= 4


def test_pathways_cli_lists_adds_and_removes_on_the_running_gateway(deployment, capsys):
    from tools.cli.main import main

    dep, _ = deployment
    gw = ["--gateway", dep.gateway]
    assert main(["pathways", "add", "short", "embed", "attn-0", "head", *gw]) == 0
    assert "short: embed -> attn-0 -> head" in capsys.readouterr().out
    assert main(["pathways", "list", *gw]) == 0
    listed = capsys.readouterr().out
    assert "short                embed -> attn-0 -> head" in listed and "tiny " in listed
    assert main(["pathways", "add", "bad", "embed", "attn-0", *gw]) == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "must end with a decoding module" in err
    assert main(["pathways", "remove", "short", *gw]) == 0
    assert main(["pathways", "remove", "short", *gw]) == 2
    assert "NOT_FOUND: unknown pathway 'short'" in capsys.readouterr().err
