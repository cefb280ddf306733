"""Running the HTTP front: flags and environment -> Settings -> uvicorn (graceful on SIGTERM)."""

from __future__ import annotations

import argparse
import os

from pathways import client, transport

ENV_GATEWAY = "PATHWAYS_GATEWAY"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gateway",
        default=os.environ.get(ENV_GATEWAY),
        metavar="HOST:PORT",
        help=f"the gRPC gateway (env {ENV_GATEWAY}; default: the running `pathways up`'s)",
    )
    p.add_argument("--host", default=os.environ.get("PATHWAYS_HTTP_HOST", "127.0.0.1"))
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("PATHWAYS_HTTP_PORT", "8000")),
        help="HTTP port (env PATHWAYS_HTTP_PORT; default 8000)",
    )
    p.add_argument(
        "--max-body-kb",
        type=int,
        default=int(os.environ.get("PATHWAYS_HTTP_MAX_BODY_KB", "1024")),
        help="larger request bodies get 413 (env PATHWAYS_HTTP_MAX_BODY_KB; default 1024)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("PATHWAYS_HTTP_TIMEOUT_S", "300")),
        help="deadline of each gateway call in seconds (default 300)",
    )
    p.add_argument(
        "--grace-s",
        type=float,
        default=float(os.environ.get("PATHWAYS_HTTP_GRACE_S", "5")),
        help="on SIGTERM, responses in flight (streams included) get this many seconds to finish "
        "while new connections are refused (env PATHWAYS_HTTP_GRACE_S; default 5)",
    )


def check_args(args) -> None:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in [1, 65535]; got {args.port}")
    if args.max_body_kb <= 0:
        raise ValueError(f"--max-body-kb must be > 0; got {args.max_body_kb}")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0; got {args.timeout}")
    if not args.grace_s >= 0:
        raise ValueError(f"--grace-s must be >= 0; got {args.grace_s}")


def settings_from_args(args, tls: transport.TLSConfig | None = None):
    """Settings from parsed flags; TLS towards the gateway as `pathways.client.target` finds it
    (the local deployment's certificate for its gateway, else PATHWAYS_TLS_DIR /
    PATHWAYS_INSECURE), unless `tls` is given. The front never uses a key of its own."""
    check_args(args)
    from pathways.http.app import Settings

    t = client.target(args.gateway, api_key="", tls=tls)
    return Settings(
        t.address, t.tls, max_body_bytes=args.max_body_kb * 1024, timeout_s=args.timeout
    )


def run(settings, host: str, port: int, grace_s: float = 5.0) -> None:
    """Serves `settings` (an app.Settings) until SIGTERM/SIGINT, then lets responses in flight
    finish for up to `grace_s` seconds."""
    import uvicorn

    from pathways.http.app import create_app

    app = create_app(settings)
    print(f"http front serving on http://{host}:{port} (gateway {settings.gateway})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_s)


def serve(args) -> None:
    """services/http_front: TLS towards the gateway from --tls-dir or --insecure (exactly one),
    then `run`."""
    if args.insecure:
        tls = transport.TLSConfig.plaintext()
    else:
        tls = transport.TLSConfig.from_dir(args.tls_dir, args.tls_server_name)
    transport.announce(tls, "http front (towards the gateway)")
    run(settings_from_args(args, tls), args.host, args.port, args.grace_s)
