"""How the CLI reaches a gateway: its address, TLS settings and API key, found without flags for
the deployment `pathways up` runs (its state file says where the local user's certificate and
key are), else from the environment (PATHWAYS_TLS_DIR or PATHWAYS_INSECURE, PATHWAYS_API_KEY)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pathways import transport
from pathways.deploy import local
from pathways.serving import auth


@dataclasses.dataclass(frozen=True)
class Gateway:
    address: str
    tls: transport.TLSConfig
    metadata: tuple[tuple[str, str], ...]  # the API key, when there is one

    def channel(self):
        return transport.channel(self.address, tls=self.tls)


def _key(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"API key file {path}: {e.strerror or e}") from None


def gateway(explicit: str | None) -> Gateway:
    """The gateway at `explicit` (None: the running local deployment's)."""
    info = local.read()
    if not explicit and not (info and info.get("gateway")):
        raise ValueError(
            "no gateway found: start one with `pathways up`, or pass --gateway HOST:PORT"
        )
    if info and info.get("gateway") and explicit in (None, info["gateway"]):
        if info.get("tls"):
            tls = transport.TLSConfig.from_dir(info["tls"])
        else:
            tls = transport.TLSConfig.plaintext()
        key = _key(info["api_key_file"]) if info.get("api_key_file") else None
        return Gateway(info["gateway"], tls, auth.client_metadata(key))
    key = os.environ.get(auth.ENV_KEY)
    return Gateway(explicit, transport.from_env(), auth.client_metadata(key))
