"""Gateway: GatewayService.Generate over the module servers of a checkpoint's pathways."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pathways import checkpoint as ckpt
from pathways.serving.gateway import GatewayServer


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
        "--wire-dtype",
        default=os.environ.get("PATHWAYS_WIRE_DTYPE", "float32"),
        choices=["float32", "bfloat16", "int8"],
    )
    args = p.parse_args(argv)
    if not args.checkpoint:
        p.error("--checkpoint (or PATHWAYS_CHECKPOINT) is required")
    modules = args.module or [m for m in os.environ.get("PATHWAYS_MODULES", "").split(";") if m]
    spec, tok = ckpt.load_spec(args.checkpoint)
    GatewayServer(
        spec,
        tok,
        parse_modules(modules),
        port=args.port,
        host=args.host,
        wire_dtype=args.wire_dtype,
    ).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
