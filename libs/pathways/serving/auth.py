"""API keys and roles at the gateway: `authorization: Bearer <key>` in gRPC metadata.

Keys are stored hashed (sha256 of a per-key salt and the key) in a JSON file:

    {"keys": [{"name": "local-admin", "role": "admin", "salt": "<hex>", "sha256": "<hex>"}]}

A key is 32 random bytes (`new_key`), so a salted sha256 cannot be searched backwards. Roles:
`generate` (Generate, Infer, ListPathways) and `admin` (everything, including AddModule, SetPathway and
RemovePathway). Health and reflection need no key. A missing or unknown key gets
UNAUTHENTICATED, a key whose role is not enough PERMISSION_DENIED; both say why.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc

from pathways import certs

ROLES = ("generate", "admin")  # each includes those before it
ENV_KEYS = "PATHWAYS_API_KEYS"
ENV_KEY = "PATHWAYS_API_KEY"  # a client's key (the CLI, when no local deployment has one)
GATEWAY = "/pathways.v1.GatewayService/"
# What each gateway method needs; a method not listed needs admin (new methods are closed).
NEEDS = {"Generate": "generate", "Infer": "generate", "ListPathways": "generate"}


class AuthError(ValueError):
    """A keys file that cannot be used; the message names the file and the entry."""


def new_key() -> str:
    return "pwk_" + secrets.token_urlsafe(32)


def _digest(salt: bytes, key: str) -> bytes:
    return hashlib.sha256(salt + key.encode()).digest()


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    name: str
    role: str
    salt: bytes
    sha256: bytes

    def matches(self, key: str) -> bool:
        return hmac.compare_digest(_digest(self.salt, key), self.sha256)


def hashed(name: str, role: str, key: str) -> KeyEntry:
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    salt = secrets.token_bytes(16)
    return KeyEntry(name, role, salt, _digest(salt, key))


class KeyStore:
    """The gateway's API keys (hashed) and their roles."""

    def __init__(self, entries: Iterable[KeyEntry]):
        self.entries = list(entries)

    @classmethod
    def load(cls, path: str | Path) -> KeyStore:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise AuthError(f"API keys file {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise AuthError(f"API keys file {path}: not JSON ({e})") from None
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, list):
            raise AuthError(f'API keys file {path}: needs {{"keys": [...]}}')
        entries = []
        for i, k in enumerate(keys):
            try:
                entry = KeyEntry(
                    str(k["name"]), k["role"], bytes.fromhex(k["salt"]), bytes.fromhex(k["sha256"])
                )
            except (KeyError, TypeError, ValueError) as e:
                raise AuthError(
                    f"API keys file {path}: keys[{i}] needs name, role, salt and sha256 (hex): "
                    f"{type(e).__name__}: {e}"
                ) from None
            if entry.role not in ROLES:
                raise AuthError(
                    f"API keys file {path}: keys[{i}] ({entry.name!r}): role must be one of "
                    f"{', '.join(ROLES)}; got {entry.role!r}"
                )
            entries.append(entry)
        return cls(entries)

    def save(self, path: str | Path) -> None:
        """Writes the hashed keys, owner-only."""
        data = {
            "keys": [
                {"name": e.name, "role": e.role, "salt": e.salt.hex(), "sha256": e.sha256.hex()}
                for e in self.entries
            ]
        }
        certs.write_private(Path(path), (json.dumps(data, indent=1) + "\n").encode())

    def role(self, key: str) -> KeyEntry | None:
        for e in self.entries:  # every entry is checked: the time does not say which matched
            if e.matches(key):
                return e
        return None


def allows(have: str, need: str) -> bool:
    return ROLES.index(have) >= ROLES.index(need)


def bearer(metadata) -> str | None:
    for k, v in metadata or ():
        if k == "authorization":
            scheme, _, token = v.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


def client_metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a client sends with `key` (none without one)."""
    return (("authorization", f"Bearer {key}"),) if key else ()


def _refusal(handler, code: grpc.StatusCode, message: str):
    def abort(request_or_iterator, context):
        context.abort(code, message)

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class KeyInterceptor(grpc.ServerInterceptor):
    """Checks the bearer key of every GatewayService call against `store` and the method's role;
    other services (health, reflection) pass."""

    def __init__(self, store: KeyStore):
        self.store = store

    def intercept_service(self, continuation, details):
        method = details.method
        if not method.startswith(GATEWAY):
            return continuation(details)
        name = method[len(GATEWAY) :]
        need = NEEDS.get(name, "admin")
        key = bearer(details.invocation_metadata)
        if not key:
            return _refusal(
                continuation(details),
                grpc.StatusCode.UNAUTHENTICATED,
                f"{name} needs an API key: send 'authorization: Bearer <key>' metadata"
                + (" (the authorization value is not 'Bearer <key>')" if key == "" else ""),
            )
        entry = self.store.role(key)
        if entry is None:
            return _refusal(
                continuation(details),
                grpc.StatusCode.UNAUTHENTICATED,
                f"{name}: unknown API key",
            )
        if not allows(entry.role, need):
            return _refusal(
                continuation(details),
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name} needs role {need!r}; key {entry.name!r} has role {entry.role!r}",
            )
        return continuation(details)


class AddressPolicy:
    """Which "host:port" addresses AddModule may dial: shell-style patterns (`127.0.0.1:*`,
    `*.pathways.svc.cluster.local:8080`)."""

    def __init__(self, patterns: Sequence[str]):
        self.patterns = [p.strip() for p in patterns if p.strip()]

    def check(self, address: str) -> str | None:
        """None when allowed, else why not."""
        if any(fnmatch.fnmatchcase(address, p) for p in self.patterns):
            return None
        allowed = ", ".join(self.patterns) or "none"
        return (
            f"address {address!r} is not allowed for AddModule (allowed: {allowed}; the gateway's "
            f"--allow-module-address)"
        )


def peer_names(context) -> list[str] | None:
    """The common names of the client certificate of a call over TLS (mutual TLS: every client
    of a module server has one); None for a plaintext call (an --insecure server)."""
    ctx = context.auth_context() or {}
    if b"ssl" not in ctx.get("transport_security_type", []):  # plaintext says b"insecure"
        return None
    return [v.decode("utf-8", "replace") for v in ctx.get("x509_common_name", [])]


class PeerPolicy:
    """Which service certificates (common names, shell-style patterns: `coordinator`,
    `module-*`) may make a call. Plaintext calls pass: a server runs without TLS only when
    started with --insecure, which says at start that anyone may call it."""

    def __init__(self, patterns: Sequence[str], what: str):
        self.patterns = [p.strip() for p in patterns if p.strip()]
        self.what = what

    def refusal(self, context) -> str | None:
        """None when the caller may, else why not (for PERMISSION_DENIED)."""
        names = peer_names(context)
        if names is None:
            return None
        if any(fnmatch.fnmatchcase(n, p) for n in names for p in self.patterns):
            return None
        return (
            f"{self.what} answers only to service certificates ({', '.join(self.patterns)}); "
            f"the caller's certificate is {', '.join(names) or 'unnamed'}"
        )
