"""Channels and ports over real gRPC servers with real certificates: mutual TLS is required
between services, a client without a certificate or from another CA is refused."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pathways import certs, transport


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("tls")
    dirs = certs.create(out, ["server", "client"])
    other = certs.create(tmp_path_factory.mktemp("other"), ["client"])
    return {
        "server": transport.TLSConfig.from_dir(dirs["server"]),
        "client": transport.TLSConfig.from_dir(dirs["client"]),
        "foreign": transport.TLSConfig.from_dir(other["client"]),
    }


def _serve(tls, require_client_auth=True):
    server = grpc.server(futures.ThreadPoolExecutor(2), options=transport.server_options(1))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = transport.add_port(server, "127.0.0.1:0", tls, require_client_auth)
    server.start()
    return server, f"127.0.0.1:{port}"


def _check(ch) -> grpc.StatusCode | None:
    try:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return None
    except grpc.RpcError as e:
        return e.code()


def test_mutual_tls_admits_only_clients_with_a_certificate_of_the_ca(pki):
    server, address = _serve(pki["server"])
    try:
        with transport.channel(address, tls=pki["client"]) as ch:
            assert _check(ch) is None
        # A client that checks the server but has no certificate of its own.
        no_cert = grpc.ssl_channel_credentials(root_certificates=pki["client"].ca)
        with grpc.secure_channel(address, no_cert) as ch:
            assert _check(ch) == grpc.StatusCode.UNAVAILABLE
        # A certificate from another CA (which does not trust this server either).
        with transport.channel(address, tls=pki["foreign"]) as ch:
            assert _check(ch) == grpc.StatusCode.UNAVAILABLE
        # Another CA's certificate, trusting this server: the server still refuses it.
        foreign = pki["foreign"]
        mixed = transport.TLSConfig(ca=pki["client"].ca, cert=foreign.cert, key=foreign.key)
        with transport.channel(address, tls=mixed) as ch:
            assert _check(ch) == grpc.StatusCode.UNAVAILABLE
        with transport.channel(address, tls=transport.TLSConfig.plaintext()) as ch:
            assert _check(ch) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_a_port_without_client_auth_takes_server_checked_tls_only(pki):
    server, address = _serve(pki["server"], require_client_auth=False)
    try:
        no_cert = grpc.ssl_channel_credentials(root_certificates=pki["client"].ca)
        with grpc.secure_channel(address, no_cert) as ch:
            assert _check(ch) is None
        # The client does not trust another CA's server.
        with transport.channel(address, tls=pki["foreign"]) as ch:
            assert _check(ch) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_server_name_override_checks_the_certificate_against_that_name(pki, tmp_path):
    dirs = certs.create(tmp_path, ["svc"], hosts=["embed.pathways.svc"])
    server, address = _serve(transport.TLSConfig.from_dir(dirs["svc"]))
    try:
        c = pki["client"]
        client = transport.TLSConfig.from_dir(dirs["svc"], server_name="embed.pathways.svc")
        with transport.channel(address, tls=client) as ch:
            assert _check(ch) is None
        wrong = transport.TLSConfig.from_dir(dirs["svc"], server_name="head.pathways.svc")
        with transport.channel(address, tls=wrong) as ch:
            assert _check(ch) == grpc.StatusCode.UNAVAILABLE
        assert c.server_name == ""
    finally:
        server.stop(None)


def test_plaintext_on_both_sides_when_asked(caplog):
    tls = transport.TLSConfig.plaintext()
    transport.announce(tls, "test server")
    assert "WITHOUT TLS" in caplog.text
    server, address = _serve(tls)
    try:
        with transport.channel(address, tls=tls) as ch:
            assert _check(ch) is None
    finally:
        server.stop(None)


def test_settings_from_the_environment(pki, tmp_path):
    d = pki["server"].directory
    assert transport.from_env({transport.ENV_DIR: d}).directory == d
    assert transport.from_env({transport.ENV_INSECURE: "1"}, required=True).insecure
    assert transport.from_env({}).insecure  # in-process default
    with pytest.raises(transport.TLSError, match="--tls-dir DIR .* or\\s+--insecure"):
        transport.from_env({}, required=True)
    with pytest.raises(transport.TLSError, match="exclude each other"):
        transport.from_env({transport.ENV_DIR: d, transport.ENV_INSECURE: "1"})
    with pytest.raises(transport.TLSError, match=f"{tmp_path}: cannot read ca.crt"):
        transport.from_env({transport.ENV_DIR: str(tmp_path)})
    env = pki["server"].env()
    assert transport.from_env(env).cert == pki["server"].cert
    assert transport.TLSConfig.plaintext().env() == {transport.ENV_INSECURE: "1"}
