"""HTTP front: the OpenAI-compatible HTTP API (and /metrics) over a gRPC gateway."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pathways import transport
from pathways.http import server


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(prog="http_front", description=__doc__)
    server.add_args(p)
    p.add_argument(
        "--tls-dir",
        default=os.environ.get(transport.ENV_DIR, ""),
        help=f"TLS towards the gateway: a directory with ca.crt, tls.crt, tls.key (env "
        f"{transport.ENV_DIR})",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=os.environ.get(transport.ENV_INSECURE, "").lower() in ("1", "true", "yes"),
        help=f"plaintext towards the gateway (env {transport.ENV_INSECURE}=1)",
    )
    args = p.parse_args(argv)
    args.tls_server_name = os.environ.get(transport.ENV_SERVER_NAME, "")
    if bool(args.tls_dir) == args.insecure:
        p.error("give exactly one of --tls-dir DIR (TLS) and --insecure (plaintext)")
    if not args.gateway:
        p.error(f"--gateway HOST:PORT (or {server.ENV_GATEWAY}) is required")
    try:
        server.check_args(args)
        server.serve(args)
    except ValueError as e:  # TLS files that cannot be read, bad values: one line, exit 2
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
