"""A private CA and per-service certificates for mutual TLS between Pathways services.

Layout of `create(out, names)` (cert-manager's file names, so a Kubernetes Secret made from a
service's directory mounts where the code looks, see pathways.transport):

    out/ca/ca.crt, out/ca/ca.key          the CA (its key stays here; reused by later calls)
    out/<name>/ca.crt, tls.crt, tls.key   one service: the CA, its certificate and key

Each certificate is good as server and as client certificate (services call each other), for
127.0.0.1, localhost, its own name and any DNS names given. Keys are written owner-only (0600).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pathways import transport

CA_DIR = "ca"
CA_KEY = "ca.key"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
LOCAL = ("localhost", "127.0.0.1", "::1")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pathways"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(common_name: str = "Pathways private CA", days: int = 3650):
    """A self-signed CA: (private key, certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):  # in order, once each
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            entries.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(entries)


def check_host(host: str) -> str:
    """A DNS name or IP address for a certificate; ValueError names a bad one."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if len(host) > 253 or not _DNS.match(host):
        raise ValueError(f"{host!r} is not a DNS name or IP address")
    return host


def make_cert(ca_key, ca_cert, name: str, hosts: Sequence[str] = (), days: int = 825):
    """A certificate for service `name` signed by the CA, for server and client use, valid for
    127.0.0.1, localhost, `name` (when it is a DNS label) and `hosts`: (private key, cert)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    own = [name.lower()] if _DNS.match(name) else []
    sans = [*LOCAL, *own, *(check_host(h) for h in hosts)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(_san(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, data: bytes) -> None:
    """Writes `data` to `path` readable by its owner only (0600), whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def _owner_only_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def load_or_make_ca(out: str | Path):
    """The CA under `out/ca`, made there if it is not yet: (key, certificate)."""
    d = Path(out) / CA_DIR
    if (d / CA_KEY).exists():
        try:
            key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), None)
            cert = x509.load_pem_x509_certificate((d / transport.CA).read_bytes())
        except (OSError, ValueError) as e:
            raise ValueError(f"CA in {d}: {e}") from None
        return key, cert
    _owner_only_dir(d)
    key, cert = make_ca()
    write_private(d / CA_KEY, _pem_key(key))
    (d / transport.CA).write_bytes(_pem_cert(cert))
    return key, cert


def create(out: str | Path, names: Sequence[str], hosts: Sequence[str] = ()) -> dict[str, Path]:
    """A CA (kept if `out/ca` has one) and a certificate for each of `names` under `out` (see
    the module docstring); returns {name: its directory}. ValueError names a bad name or host."""
    if not names:
        raise ValueError("give at least one service name")
    for n in names:
        if not _NAME.match(n) or n == CA_DIR:
            raise ValueError(f"service name {n!r} must match {_NAME.pattern} and not be {CA_DIR!r}")
    hosts = [check_host(h) for h in hosts]
    out = Path(out)
    _owner_only_dir(out)
    ca_key, ca_cert = load_or_make_ca(out)
    dirs = {}
    for n in names:
        key, cert = make_cert(ca_key, ca_cert, n, hosts)
        d = out / n
        _owner_only_dir(d)
        write_private(d / transport.KEY, _pem_key(key))
        (d / transport.CERT).write_bytes(_pem_cert(cert))
        (d / transport.CA).write_bytes(_pem_cert(ca_cert))
        dirs[n] = d
    return dirs


GATEWAY, COORDINATOR, CLIENT = "gateway", "coordinator", "client"


def module_identity(module: str) -> str:
    """The certificate name of a module's servers (every replica shares it); a server hosting
    several modules ("attn-0,attn-1") is "module-attn-0+attn-1"."""
    return f"module-{module.replace(',', '+')}"


class Identities:
    """The TLS settings of a local deployment's processes: one certificate per service under
    `root` (see `create`), made on first use; `root` None: every process in plaintext."""

    def __init__(self, root: str | Path | None):
        self.root = None if root is None else Path(root)

    @property
    def insecure(self) -> bool:
        return self.root is None

    def tls(self, name: str) -> transport.TLSConfig:
        """Service `name`'s settings (its certificate is made if it has none yet)."""
        if self.root is None:
            return transport.TLSConfig.plaintext()
        if not (self.root / name / transport.KEY).exists():
            create(self.root, [name])
        return transport.TLSConfig.from_dir(self.root / name)

    def env(self, name: str) -> dict[str, str]:
        """The environment that starts a process as service `name`."""
        return self.tls(name).env()
