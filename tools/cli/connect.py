"""How the CLI reaches a gateway: its address, TLS settings and API key, found without flags for
the deployment `pathways up` runs (its state file says where the local user's certificate and
key are), else from the environment (PATHWAYS_TLS_DIR or PATHWAYS_INSECURE, PATHWAYS_API_KEY).
The rules are `pathways.client.target`'s."""

from __future__ import annotations

import dataclasses

from pathways import client, transport


@dataclasses.dataclass(frozen=True)
class Gateway:
    address: str
    tls: transport.TLSConfig
    metadata: tuple[tuple[str, str], ...]  # the API key, when there is one

    def channel(self):
        """A channel to it, retrying what `pathways.client.RETRY_POLICY` retries."""
        return transport.channel(self.address, client.with_retries(()), tls=self.tls)


def gateway(explicit: str | None) -> Gateway:
    """The gateway at `explicit` (None: the running local deployment's)."""
    t = client.target(explicit)
    return Gateway(t.address, t.tls, t.metadata)
