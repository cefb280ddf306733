"""Gateway: GatewayService.Generate over the module servers of a checkpoint's pathways."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pathways import checkpoint as ckpt
from pathways import transport
from pathways.deploy.local import server_names
from pathways.serving import auth
from pathways.serving.episodes import DEFAULT_TTL_S
from pathways.serving.gateway import MAX_PROMPT_BYTES, GatewayServer
from pathways.serving.pathway_store import StoreError


def parse_modules(values: list[str]) -> dict[str, list[str]]:
    """["embed=h:1,h:2", ...] -> {"embed": ["h:1", "h:2"]} (a module may repeat to add replicas)."""
    out: dict[str, list[str]] = {}
    for v in values:
        name, sep, addrs = v.partition("=")
        hosts = [a.strip() for a in addrs.split(",") if a.strip()]
        if not sep or not name or not hosts:
            raise ValueError(f"--module must be NAME=HOST:PORT[,HOST:PORT...]; got {v!r}")
        out.setdefault(name, []).extend(hosts)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(prog="gateway", description=__doc__)
    p.add_argument("--checkpoint", default=os.environ.get("PATHWAYS_CHECKPOINT"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PATHWAYS_PORT", "0")))
    p.add_argument("--host", default=os.environ.get("PATHWAYS_HOST", "127.0.0.1"))
    p.add_argument(
        "--module",
        action="append",
        default=[],
        help="NAME=HOST:PORT[,HOST:PORT...] (repeatable; env PATHWAYS_MODULES, "
        "separated by ';')",
    )
    p.add_argument(
        "--discover",
        default=os.environ.get("PATHWAYS_DISCOVER", "static"),
        help="where module replicas come from: 'static' (the --module addresses; default) or "
        "'k8s' (watch the Endpoints of each module's Service, so scaling a module's Deployment "
        "changes the replicas new sessions use; env PATHWAYS_DISCOVER)",
    )
    p.add_argument(
        "--namespace",
        default=os.environ.get("PATHWAYS_NAMESPACE"),
        help="k8s discovery: the module Services' namespace (env PATHWAYS_NAMESPACE; in a pod "
        "it defaults to the pod's service-account namespace)",
    )
    p.add_argument(
        "--kubeconfig",
        help="k8s discovery from outside the cluster with this kubeconfig's credentials "
        "(default: the pod's service account)",
    )
    p.add_argument(
        "--colocate",
        action="append",
        default=[],
        help="k8s discovery: consecutive modules one server hosts, e.g. attn-0,attn-1 "
        "(repeatable; env PATHWAYS_COLOCATE, groups separated by ';'): their Service is named "
        "after the group and a step through them is one call",
    )
    p.add_argument(
        "--wire-dtype",
        default=os.environ.get("PATHWAYS_WIRE_DTYPE", "float32"),
        choices=["float32", "bfloat16", "int8"],
    )
    p.add_argument(
        "--lockstep-ms",
        type=float,
        default=float(os.environ.get("PATHWAYS_LOCKSTEP_MS", "20")),
        help="longest wait of a decode step at a module for the other sessions decoding through "
        "this gateway, so module servers batch them; the steps that meet at a replica go in one "
        "message (0: never wait, every step its own message; env PATHWAYS_LOCKSTEP_MS)",
    )
    p.add_argument(
        "--tls-dir",
        default=os.environ.get(transport.ENV_DIR, ""),
        help="TLS: a directory with ca.crt, tls.crt and tls.key (the gateway's certificate, also "
        f"its client certificate at the module servers; env {transport.ENV_DIR})",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=os.environ.get(transport.ENV_INSECURE, "").lower() in ("1", "true", "yes"),
        help=f"plaintext instead of TLS (env {transport.ENV_INSECURE}=1)",
    )
    p.add_argument(
        "--api-keys",
        default=os.environ.get(auth.ENV_KEYS, ""),
        help="JSON file of hashed API keys and their roles (pathways.serving.auth); without it "
        f"every caller is admin, which is logged (env {auth.ENV_KEYS})",
    )
    p.add_argument(
        "--allow-module-address",
        action="append",
        default=[],
        metavar="PATTERN",
        help="HOST:PORT pattern (shell-style, e.g. 127.0.0.1:*) AddModule may dial (repeatable; "
        "env PATHWAYS_ALLOWED_MODULE_ADDRESSES, comma-separated; default: the --module "
        "addresses)",
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=int(os.environ.get("PATHWAYS_HEALTH_PORT", "0")),
        help="a second port answering only grpc.health.v1, in plaintext, for Kubernetes' probes "
        "(0: none; env PATHWAYS_HEALTH_PORT)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("PATHWAYS_METRICS_PORT", "0")),
        help="a plaintext port serving GET /metrics in Prometheus' format (0: none; env "
        "PATHWAYS_METRICS_PORT)",
    )
    p.add_argument(
        "--max-prompt-bytes",
        type=int,
        default=int(os.environ.get("PATHWAYS_MAX_PROMPT_BYTES", str(MAX_PROMPT_BYTES))),
        help="longest prompt accepted, in UTF-8 bytes, checked before tokenizing (env "
        "PATHWAYS_MAX_PROMPT_BYTES)",
    )
    p.add_argument(
        "--session-ttl-s",
        type=float,
        default=float(os.environ.get("PATHWAYS_SESSION_TTL_S", str(DEFAULT_TTL_S))),
        help="an episode of a pathway that acts (Infer with a session) is closed after this "
        "many seconds without a step (env PATHWAYS_SESSION_TTL_S)",
    )
    p.add_argument(
        "--pathways-file",
        default=os.environ.get("PATHWAYS_PATHWAYS_FILE", ""),
        metavar="FILE",
        help="keeps the pathway table's changes (AddModule, SetPathway, RemovePathway) in FILE, "
        "applied again when the gateway restarts; written for one checkpoint (env "
        "PATHWAYS_PATHWAYS_FILE; default: none, changes last until the gateway stops)",
    )
    p.add_argument(
        "--grace-s",
        type=float,
        default=float(os.environ.get("PATHWAYS_GRACE_S", "5")),
        help="on SIGTERM, generations in flight get this many seconds to finish while new "
        "calls are refused; the gateway exits as soon as none is left (env PATHWAYS_GRACE_S; "
        "default 5; keep it under the pod's terminationGracePeriodSeconds)",
    )
    args = p.parse_args(argv)
    if not args.grace_s >= 0:
        p.error(f"--grace-s must be >= 0; got {args.grace_s}")
    if not args.session_ttl_s > 0:
        p.error(f"--session-ttl-s must be > 0; got {args.session_ttl_s}")
    if args.max_prompt_bytes < 1:
        p.error(f"--max-prompt-bytes must be >= 1; got {args.max_prompt_bytes}")
    if not 0 <= args.metrics_port < 65536:
        p.error(f"--metrics-port must be in [0, 65535]; got {args.metrics_port}")
    allowed = args.allow_module_address or [
        a for a in os.environ.get("PATHWAYS_ALLOWED_MODULE_ADDRESSES", "").split(",") if a.strip()
    ]
    if bool(args.tls_dir) == args.insecure:
        p.error("give exactly one of --tls-dir DIR (TLS) and --insecure (plaintext)")
    server_name = os.environ.get(transport.ENV_SERVER_NAME, "")
    if args.lockstep_ms < 0:
        p.error(f"--lockstep-ms must be >= 0; got {args.lockstep_ms}")
    if not args.checkpoint:
        p.error("--checkpoint (or PATHWAYS_CHECKPOINT) is required")
    if args.discover not in ("static", "k8s"):
        p.error(f"--discover must be 'static' or 'k8s'; got {args.discover!r}")
    modules = args.module or [m for m in os.environ.get("PATHWAYS_MODULES", "").split(";") if m]
    if args.discover == "k8s" and args.module:
        p.error("--module addresses and --discover k8s exclude each other")
    if args.discover == "static" and args.kubeconfig:
        p.error("--kubeconfig needs --discover k8s")
    if args.discover == "k8s" and args.kubeconfig and not args.namespace:
        p.error("--discover k8s with --kubeconfig needs --namespace (or PATHWAYS_NAMESPACE)")
    spec, tok = ckpt.load_spec(args.checkpoint)
    colocate = args.colocate or [g for g in os.environ.get("PATHWAYS_COLOCATE", "").split(";") if g]
    groups = [[m.strip() for m in g.split(",")] for g in colocate]
    if groups and args.discover != "k8s":
        p.error(
            "--colocate needs --discover k8s (with --module addresses, list a group's modules "
            "at the same addresses)"
        )
    try:
        # a group's server as discovery and the executor name it ("attn-0+attn-1")
        servers = [s.replace(",", "+") for s in server_names(spec, list(spec.modules), groups)]
    except ValueError as e:
        p.error(str(e))
    try:
        tls = (
            transport.TLSConfig.plaintext()
            if args.insecure
            else transport.TLSConfig.from_dir(args.tls_dir, server_name)
        )
        keys = auth.KeyStore.load(args.api_keys) if args.api_keys else None
    except (transport.TLSError, auth.AuthError) as e:
        p.error(str(e))
    watcher = None
    if args.discover == "k8s":
        from pathways.k8s import discovery  # the Kubernetes client only when discovering

        if args.kubeconfig:
            watcher = discovery.from_kubeconfig(servers, args.namespace, args.kubeconfig)
        else:
            watcher = discovery.in_cluster(servers, args.namespace)
        replicas = watcher
    else:
        replicas = parse_modules(modules)
    try:
        server = GatewayServer(
            spec,
            tok,
            replicas,
            port=args.port,
            host=args.host,
            wire_dtype=args.wire_dtype,
            lockstep_wait_s=args.lockstep_ms / 1e3,
            tls=tls,
            keys=keys,
            allowed_addresses=allowed or None,
            health_port=args.health_port,
            checkpoint=args.checkpoint,
            metrics_port=args.metrics_port,
            max_prompt_bytes=args.max_prompt_bytes,
            session_ttl_s=args.session_ttl_s,
            pathways_file=args.pathways_file or None,
            colocated=groups,
            grace_s=args.grace_s,
        )
        server.serve_forever()
    except StoreError as e:  # a pathways file that does not apply: say which entry, exit 2
        p.error(str(e))
    finally:
        if watcher is not None:
            watcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
