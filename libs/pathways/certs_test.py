"""The CA and service certificates: usages, names, file modes, bad input."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from pathways import certs, transport


def test_service_certificates_are_signed_by_one_ca_for_server_and_client_use(tmp_path):
    dirs = certs.create(tmp_path, ["gateway", "attn_0"], hosts=["gw.example.com", "10.0.0.7"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    for name, d in dirs.items():
        cert = x509.load_pem_x509_certificate((d / "tls.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert (d / "ca.crt").read_bytes() == (tmp_path / "ca" / "ca.crt").read_bytes()
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        ips = san.get_values_for_type(x509.IPAddress)
        assert {"localhost", "gw.example.com"} <= set(dns)
        assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.7")} <= set(ips)
        assert ("gateway" in dns) == (name == "gateway")  # attn_0 is no DNS label
        assert stat.S_IMODE((d / "tls.key").stat().st_mode) == 0o600
        transport.TLSConfig.from_dir(d)  # what a service loads
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700


def test_a_second_call_keeps_the_ca(tmp_path):
    certs.create(tmp_path, ["a"])
    first = (tmp_path / "ca" / "ca.crt").read_bytes()
    certs.create(tmp_path, ["b"])
    assert (tmp_path / "ca" / "ca.crt").read_bytes() == first
    assert (tmp_path / "b" / "ca.crt").read_bytes() == first


@pytest.mark.parametrize(
    "names,hosts,match",
    [
        ([], [], "at least one service name"),
        (["../x"], [], "service name '../x' must match"),
        (["ca"], [], "not be 'ca'"),
        (["ok"], ["bad host!"], "'bad host!' is not a DNS name or IP address"),
    ],
)
def test_bad_names_are_refused(tmp_path, names, hosts, match):
    with pytest.raises(ValueError, match=match):
        certs.create(tmp_path, names, hosts)
