"""`pathways certs --out DIR --names A B ...`: a private CA and a certificate per service."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "certs",
        help="make a private CA and a TLS certificate per service (for deployments other than "
        "`up`, which makes its own)",
    )
    p.add_argument("--out", required=True, help="directory: ca/ and one directory per name")
    p.add_argument(
        "--names",
        nargs="+",
        required=True,
        metavar="NAME",
        help="services (one certificate each; a later run reuses the CA in DIR/ca)",
    )
    p.add_argument(
        "--hosts",
        nargs="*",
        default=[],
        metavar="HOST",
        help="DNS names or IP addresses every certificate is also valid for (127.0.0.1 and "
        "localhost always are)",
    )
    p.set_defaults(func=cmd_certs)


def cmd_certs(args) -> int:
    from pathways import certs

    dirs = certs.create(args.out, args.names, args.hosts)
    for name, d in dirs.items():
        print(f"{name:<16} {d}")
    print(
        "each directory holds ca.crt, tls.crt and tls.key (0600): point a service at it with "
        "--tls-dir or PATHWAYS_TLS_DIR; as a Kubernetes Secret: kubectl create secret generic "
        "NAME --from-file=DIR",
        file=sys.stderr,
    )
    return 0
