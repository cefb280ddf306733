"""The one place that opens gRPC channels and server ports: TLS, mutual between services, or
plaintext only when asked for explicitly; and the helpers every servicer shares (options, the
error-to-status decorator, deadlines).

A process's TLS files are one directory with cert-manager's names: `ca.crt` (the CA every peer
must be signed by), `tls.crt` and `tls.key` (this service's certificate, used as server and as
client certificate). Where it is: `PATHWAYS_TLS_DIR` (services: `--tls-dir`); plaintext:
`PATHWAYS_INSECURE=1` (`--insecure`), logged as a warning at start.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

ENV_DIR = "PATHWAYS_TLS_DIR"
ENV_INSECURE = "PATHWAYS_INSECURE"
# Name the server certificates are checked against instead of the dialed host (pod IPs found by
# discovery are in no certificate); unset: the host of the address.
ENV_SERVER_NAME = "PATHWAYS_TLS_SERVER_NAME"
CA, CERT, KEY = "ca.crt", "tls.crt", "tls.key"
_TRUE = ("1", "true", "yes")
# Trailing metadata of a RESOURCE_EXHAUSTED answer: how long to wait before retrying, in ms
# (module servers set it for a full KV-cache pool; the gateway passes a module's on).
RETRY_AFTER_KEY = "retry-after-ms"


class TLSError(ValueError):
    """TLS settings that cannot be used (missing or unreadable files, contradictory settings)."""


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """PEM bytes of the CA and of this service's certificate and key, or `insecure` plaintext."""

    ca: bytes = b""
    cert: bytes = b""
    key: bytes = b""
    insecure: bool = False
    directory: str = ""  # where the files came from (messages, children's environment)
    server_name: str = ""  # see ENV_SERVER_NAME

    def __post_init__(self):
        if not self.insecure and not (self.ca and self.cert and self.key):
            raise TLSError("TLS needs a CA certificate, a certificate and its key")

    @classmethod
    def from_dir(cls, path: str | Path, server_name: str = "") -> TLSConfig:
        """Reads `ca.crt`, `tls.crt` and `tls.key` from `path`; TLSError names a missing file."""
        path = Path(path)
        files = {}
        for attr, name in (("ca", CA), ("cert", CERT), ("key", KEY)):
            try:
                files[attr] = (path / name).read_bytes()
            except OSError as e:
                raise TLSError(
                    f"TLS directory {path}: cannot read {name} ({e.strerror or e}); it needs "
                    f"{CA}, {CERT} and {KEY} (make them with `pathways certs`)"
                ) from None
            if b"-----BEGIN" not in files[attr]:
                raise TLSError(f"TLS directory {path}: {name} is not PEM")
        return cls(**files, directory=str(path), server_name=server_name)

    @classmethod
    def plaintext(cls) -> TLSConfig:
        return cls(insecure=True)

    def env(self) -> dict[str, str]:
        """The environment that gives a child process these settings."""
        if self.insecure:
            return {ENV_INSECURE: "1"}
        if not self.directory:
            raise TLSError("TLS settings not read from a directory cannot be passed on")
        out = {ENV_DIR: self.directory}
        if self.server_name:
            out[ENV_SERVER_NAME] = self.server_name
        return out

    def describe(self) -> str:
        return "plaintext (--insecure)" if self.insecure else f"mutual TLS ({self.directory})"


def check_choice(env: Mapping[str, str] = os.environ) -> bool:
    """Whether `env` asks for plaintext (True) or TLS (False), without reading any file;
    TLSError when it asks for both or neither (service entry points check this at start)."""
    directory = env.get(ENV_DIR, "")
    insecure = env.get(ENV_INSECURE, "").lower() in _TRUE
    if directory and insecure:
        raise TLSError(f"{ENV_DIR} and {ENV_INSECURE} exclude each other")
    if not directory and not insecure:
        raise TLSError(
            f"no TLS settings: give --tls-dir DIR (or {ENV_DIR}) holding {CA}, {CERT} and {KEY}, "
            f"or --insecure (or {ENV_INSECURE}=1) for plaintext"
        )
    return insecure


def from_env(env: Mapping[str, str] = os.environ, required: bool = False) -> TLSConfig:
    """The TLS settings in `env` (see the module docstring).

    Args:
      env: the environment to read.
      required: with neither setting, raise (service entry points: plaintext must be asked for)
        instead of falling back to plaintext (in-process servers and clients, tests).
    """
    if not required and not env.get(ENV_DIR) and not env.get(ENV_INSECURE):
        return TLSConfig.plaintext()
    if check_choice(env):
        return TLSConfig.plaintext()
    return TLSConfig.from_dir(env[ENV_DIR], env.get(ENV_SERVER_NAME, ""))


@functools.cache
def default() -> TLSConfig:
    """This process's settings from its environment, read once (plaintext when none is set)."""
    return from_env()


def announce(tls: TLSConfig, who: str) -> None:
    """Says at start how `who` talks: a warning when it is plaintext."""
    if tls.insecure:
        log.warning(
            "%s runs WITHOUT TLS (--insecure): anyone who can reach its port can read its "
            "traffic and call it; use only on a trusted machine or network",
            who,
        )
    else:
        log.info("%s: %s", who, tls.describe())


def grpc_options(max_message_mb: float) -> list[tuple[str, int]]:
    n = int(max_message_mb * 2**20)
    return [("grpc.max_receive_message_length", n), ("grpc.max_send_message_length", n)]


def server_options(max_message_mb: float) -> list[tuple[str, int]]:
    """Options of our gRPC servers: gRPC's default SO_REUSEPORT off, so that a server given a
    port another one already listens on fails to bind instead of silently sharing its
    connections (two local servers racing for one port then answered for each other)."""
    return [*grpc_options(max_message_mb), ("grpc.so_reuseport", 0)]


def channel(
    address: str, options: Sequence[tuple[str, object]] = (), tls: TLSConfig | None = None
) -> grpc.Channel:
    """A channel to `address`: TLS with this service's certificate as client certificate, or
    plaintext when `tls` (default: this process's, `default()`) is insecure."""
    tls = default() if tls is None else tls
    if tls.insecure:
        return grpc.insecure_channel(address, options=list(options))
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )
    opts = list(options)
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, creds, options=opts)


def aio_channel(
    address: str,
    options: Sequence[tuple[str, object]] = (),
    tls: TLSConfig | None = None,
    interceptors: Sequence[object] = (),
) -> grpc.aio.Channel:
    """`channel`'s asyncio twin (grpc.aio), with the same TLS rules."""
    tls = default() if tls is None else tls
    icpt = list(interceptors) or None
    if tls.insecure:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=icpt)
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )
    opts = list(options)
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(address, creds, options=opts, interceptors=icpt)


def add_port(
    server: grpc.Server,
    address: str,
    tls: TLSConfig | None = None,
    require_client_auth: bool = True,
) -> int:
    """Binds `address` ("host:port", port 0: a free one) and returns the port. With TLS, clients
    must present a certificate signed by the CA unless `require_client_auth` is False (the
    gateway's port, where users authenticate with API keys)."""
    tls = default() if tls is None else tls
    if tls.insecure:
        return server.add_insecure_port(address)
    creds = grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=require_client_auth
    )
    return server.add_secure_port(address, creds)


def health_server(health_servicer, host: str, port: int) -> tuple[grpc.Server, int]:
    """A plaintext server answering only grpc.health.v1 from `health_servicer` (the one the
    main port serves), on its own two threads: Kubernetes' gRPC probes cannot speak TLS, and
    health stays answered when every handler thread of the main port is busy. Returns the
    (not yet started) server and its port."""
    from concurrent import futures

    from grpc_health.v1 import health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2), options=server_options(1))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, server.add_insecure_port(f"{host}:{port}")


def deadline(context) -> float | None:
    """The call's deadline on time.monotonic()'s clock, or None."""
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left


def status(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a failed request (or group step) gets: typed errors (a `code` class attribute,
    e.g. pathways.serving.errors) their own code, a tensor that does not decode
    INVALID_ARGUMENT, anything else INTERNAL."""
    from pathways import codec

    code = getattr(type(e), "code", None)
    if isinstance(code, grpc.StatusCode):
        return code, str(e)
    if isinstance(e, codec.CodecError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"


def set_retry_after(context, seconds: float) -> None:
    """Tells the caller of a failing call how long to wait (trailing metadata, `retry_after`)."""
    context.set_trailing_metadata(((RETRY_AFTER_KEY, str(max(0, int(seconds * 1000)))),))


def retry_after(trailing) -> float | None:
    """The wait in seconds a failed call's trailing metadata asks for (None: no hint)."""
    for k, v in trailing or ():
        if k == RETRY_AFTER_KEY:
            try:
                return int(v) / 1000
            except ValueError:
                return None
    return None


def rpc(method):
    """Decorates a servicer method: maps errors to status codes (the server survives any
    request), counts the call (`self.count_request()`, except Describe) and records its latency
    (`self.metrics.latency`)."""

    counted = method.__name__ != "Describe"  # asking a server how busy it is is no traffic

    @functools.wraps(method)
    def wrapper(self, request, context):
        t0 = time.perf_counter()
        if counted:
            self.count_request()
        try:
            return method(self, request, context)
        except Exception as e:
            if isinstance(e, grpc.RpcError) or type(e).__name__ == "_AbortionError":
                raise
            code, message = status(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method.__name__)
            retry = getattr(e, "retry_after_s", None)
            if retry is not None:
                set_retry_after(context, retry)
            context.abort(code, message)
        finally:
            self.metrics.latency(method.__name__, (time.perf_counter() - t0) * 1e3)

    return wrapper
