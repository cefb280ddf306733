"""A secured local deployment (what `pathways up` runs): mutual TLS at every module server, API
keys and roles at the gateway, AddModule confined to allowed addresses, and the CLI working
against it with no extra flags. Real processes, real certificates."""

from __future__ import annotations

import json
import os

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pathways import certs, codec, transport
from pathways.deploy.local import LocalDeployment
from pathways.serving import auth
from pathways.serving.testing import make_checkpoint
from pathways.v1 import gateway_pb2, gateway_pb2_grpc, module_pb2, module_pb2_grpc

pytestmark = pytest.mark.slow
GENERATE_KEY = auth.new_key()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    ckpt = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(ckpt)
    # A key with the generate role beside the admin key `up` makes for the local user.
    auth.KeyStore([auth.hashed("reader", "generate", GENERATE_KEY)]).save(home / "api-keys.json")
    saved = os.environ.get("PATHWAYS_HOME")
    os.environ["PATHWAYS_HOME"] = str(home)  # the state file the CLI reads
    try:
        with LocalDeployment(ckpt, coordinator=False, secure_dir=home) as dep:
            yield dep, home
    finally:
        if saved is None:
            os.environ.pop("PATHWAYS_HOME", None)
        else:
            os.environ["PATHWAYS_HOME"] = saved


def _describe(address: str, ch=None, tls=None) -> grpc.StatusCode | None:
    ch = ch or transport.channel(address, tls=tls)
    try:
        module_pb2_grpc.ModuleServiceStub(ch).Describe(module_pb2.DescribeRequest(), timeout=10)
        return None
    except grpc.RpcError as e:
        return e.code()
    finally:
        ch.close()


def test_module_servers_admit_only_clients_with_a_service_certificate(deployment, tmp_path):
    dep, home = deployment
    address = dep.fleet.endpoints["embed"][0]
    client = transport.TLSConfig.from_dir(home / "tls" / certs.CLIENT)
    assert _describe(address, tls=client) is None
    no_cert = grpc.ssl_channel_credentials(root_certificates=client.ca)
    assert _describe(address, grpc.secure_channel(address, no_cert)) == grpc.StatusCode.UNAVAILABLE
    assert _describe(address, tls=transport.TLSConfig.plaintext()) == grpc.StatusCode.UNAVAILABLE
    other = certs.create(tmp_path, ["intruder"])["intruder"]  # a CA of its own
    assert _describe(address, tls=transport.TLSConfig.from_dir(other)) == (
        grpc.StatusCode.UNAVAILABLE
    )
    # The state file says where the local user's certificate and key are; keys are owner-only.
    info = json.loads((home / "deployment.json").read_text())
    assert info["tls"] == str(home / "tls" / certs.CLIENT) and not info["insecure"]
    assert (home / "client.key").stat().st_mode & 0o077 == 0
    assert (home / "api-keys.json").stat().st_mode & 0o077 == 0
    assert "pwk_" not in (home / "api-keys.json").read_text()  # hashed, not the keys


def _gateway(dep, home):
    tls = transport.TLSConfig.from_dir(home / "tls" / certs.CLIENT)
    ch = transport.channel(dep.gateway, tls=tls)
    return ch, gateway_pb2_grpc.GatewayServiceStub(ch)


def _code(call, request, key=None):
    try:
        r = call(request, timeout=30, metadata=auth.client_metadata(key))
        if not hasattr(r, "ByteSize"):  # a stream: read it all
            list(r)
        return None, ""
    except grpc.RpcError as e:
        return e.code(), e.details()


def test_gateway_keys_and_roles(deployment):
    dep, home = deployment
    admin = (home / "client.key").read_text().strip()
    ch, stub = _gateway(dep, home)
    try:
        gen = gateway_pb2.GenerateRequest(
            pathway="tiny", prompt="def ", sampling=gateway_pb2.SamplingOptions(max_new_tokens=4)
        )
        add = gateway_pb2.SetPathwayRequest(name="short", modules=["embed", "attn-0", "head"])
        code, msg = _code(stub.Generate, gen)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "needs an API key" in msg
        code, msg = _code(stub.Generate, gen, "pwk_wrong")
        assert code == grpc.StatusCode.UNAUTHENTICATED and "unknown API key" in msg
        assert _code(stub.Generate, gen, GENERATE_KEY) == (None, "")
        assert _code(stub.ListPathways, gateway_pb2.ListPathwaysRequest(), GENERATE_KEY)[0] is None
        code, msg = _code(stub.SetPathway, add, GENERATE_KEY)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert msg == "SetPathway needs role 'admin'; key 'reader' has role 'generate'"
        code, _ = _code(stub.RemovePathway, gateway_pb2.RemovePathwayRequest(name="tiny"), None)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert _code(stub.SetPathway, add, admin) == (None, "")
        remove = gateway_pb2.RemovePathwayRequest(name="short")
        assert _code(stub.RemovePathway, remove, admin) == (None, "")
        # Health needs no key.
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        ch.close()


def test_add_module_dials_only_allowed_addresses(deployment):
    dep, home = deployment
    admin = (home / "client.key").read_text().strip()
    ch, stub = _gateway(dep, home)
    try:
        req = gateway_pb2.AddModuleRequest(name="x", addresses=["10.1.2.3:50051"])
        code, msg = _code(stub.AddModule, req, admin)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "addresses[0]: address '10.1.2.3:50051' is not allowed for AddModule" in msg
        code, _ = _code(stub.AddModule, req, GENERATE_KEY)  # the role is checked first
        assert code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        ch.close()


def test_the_cli_uses_the_deployment_certificate_and_key_without_flags(deployment, capsys):
    from tools.cli.main import main

    dep, _ = deployment
    assert main(["pathways", "list"]) == 0
    assert "tiny " in capsys.readouterr().out
    assert main(["pathways", "add", "short", "embed", "attn-0", "head"]) == 0  # admin
    assert main(["pathways", "remove", "short", "--gateway", dep.gateway]) == 0
    capsys.readouterr()
    assert main(["generate", "--gateway", dep.gateway, "--prompt", "ab", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("ab")


def test_training_save_and_load_stay_under_the_servers_directories(deployment, tmp_path):
    """TrainingService.Save/Load once read and wrote any path of the server's filesystem."""
    from pathways.v1 import training_pb2, training_pb2_grpc

    dep, home = deployment
    outside = tmp_path.parents[2] / "pathways-victim"  # above the run and checkpoint directories
    link = dep.checkpoint + "/escape"
    os.symlink(outside, link)
    tls = dep.identities.tls(certs.COORDINATOR)  # the coordinator trains; users do not
    with transport.channel(dep.fleet.endpoints["head"][0], tls=tls) as ch:
        stub = training_pb2_grpc.TrainingServiceStub(ch)
        for call, req in [
            (stub.Save, training_pb2.SaveRequest(directory=str(outside))),
            (stub.Save, training_pb2.SaveRequest(directory=dep.checkpoint + "/../../../x")),
            (stub.Save, training_pb2.SaveRequest(directory=link + "/run")),
            (stub.Load, training_pb2.LoadRequest(directory="/etc")),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                call(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
            assert "is outside the allowed directories" in e.value.details()
        # Inside the checkpoint's run directory the path passes; this server was never
        # configured for training, which is the next check.
        with pytest.raises(grpc.RpcError) as e:
            stub.Save(training_pb2.SaveRequest(directory=dep.checkpoint + "/run"), timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not outside.exists()


def test_training_answers_only_service_certificates_and_never_changes_served_weights(
    deployment, tmp_path
):
    """TrainingService once trained the served weights in place, for any caller: now it trains
    a copy of its own for service certificates only, and the served weights change only through
    the gateway's admin Publish."""
    from pathways.v1 import training_pb2, training_pb2_grpc

    dep, home = deployment
    admin = (home / "client.key").read_text().strip()
    address = dep.fleet.endpoints["head"][0]
    user = transport.TLSConfig.from_dir(home / "tls" / certs.CLIENT)
    with transport.channel(address, tls=user) as ch:  # the local user's certificate
        configure = training_pb2.ConfigureRequest(
            module="head",
            optimizer=training_pb2.OptimizerConfig(lr=0.5, steps=10, warmup=1, clip=1.0),
        )
        with pytest.raises(grpc.RpcError) as e:
            training_pb2_grpc.TrainingServiceStub(ch).Configure(configure, timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "answers only to service certificates" in e.value.details()
        assert "certificate is client" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # nor may it publish to the module server
            module_pb2_grpc.ModuleServiceStub(ch).Publish(
                module_pb2.PublishRequest(from_training=True), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    ch, gw = _gateway(dep, home)
    gen = gateway_pb2.GenerateRequest(
        pathway="tiny", prompt="def ", sampling=gateway_pb2.SamplingOptions(max_new_tokens=8)
    )

    def text():
        md = auth.client_metadata(admin)
        return "".join(r.text for r in gw.Generate(gen, timeout=60, metadata=md))

    try:
        before = text()
        coordinator = dep.identities.tls(certs.COORDINATOR)
        with transport.channel(address, tls=coordinator) as tch:
            stub = training_pb2_grpc.TrainingServiceStub(tch)
            stub.Configure(configure, timeout=30)
            rng = np.random.default_rng(0)
            x = codec.encode(rng.standard_normal((2, 8, 128)).astype(np.float32))
            targets = codec.encode(rng.integers(0, 257, (2, 8)).astype(np.int32))
            for _ in range(3):
                stub.Forward(
                    training_pb2.TrainForwardRequest(micro_batch=0, input=x, targets=targets),
                    timeout=30,
                )
                one = codec.encode(np.array(1.0, np.float32))  # d loss / d loss, at the head
                stub.Backward(
                    training_pb2.TrainBackwardRequest(micro_batch=0, grad=one), timeout=30
                )
                stub.Apply(training_pb2.ApplyRequest(), timeout=30)
        assert text() == before  # trained, but not served
        publish = gateway_pb2.PublishModulesRequest(modules=["head"], from_training=True)
        code, msg = _code(gw.Publish, publish, GENERATE_KEY)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "Publish needs role 'admin'" in msg
        assert text() == before
        r = gw.Publish(publish, timeout=120, metadata=auth.client_metadata(admin))
        assert list(r.published) == [f"head@{address}"]
        assert text() != before  # the head's trained copy (lr 0.5) is served now
        # Back to the checkpoint's weights (a training run's checkpoint publishes the same way).
        again = gateway_pb2.PublishModulesRequest(modules=["head"], checkpoint=dep.checkpoint)
        gw.Publish(again, timeout=120, metadata=auth.client_metadata(admin))
        assert text() == before
        bad = gateway_pb2.PublishModulesRequest(checkpoint="/etc")
        code, msg = _code(gw.Publish, bad, admin)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "outside the allowed" in msg
    finally:
        ch.close()


def test_training_service_is_off_unless_the_server_is_started_for_training(deployment):
    from pathways.deploy import launcher
    from pathways.v1 import training_pb2, training_pb2_grpc

    dep, home = deployment
    proc = launcher.start_module(dep.checkpoint, "head", {"PATHWAYS_CPU_THREADS": "1"})
    try:
        launcher.wait_healthy(proc.address, proc, 300, tls=transport.TLSConfig.plaintext())
        with transport.channel(proc.address, tls=transport.TLSConfig.plaintext()) as ch:
            with pytest.raises(grpc.RpcError) as e:
                training_pb2_grpc.TrainingServiceStub(ch).Reset(
                    training_pb2.ResetRequest(), timeout=10
                )
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # Serving itself is there.
            module_pb2_grpc.ModuleServiceStub(ch).Describe(module_pb2.DescribeRequest(), timeout=10)
    finally:
        proc.stop()
