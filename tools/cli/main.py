"""The `pathways` command line. Each command group lives in its own module with `register()`."""

from __future__ import annotations

import argparse
import os
import sys

from pathways.backends import BackendError, check_settings
from tools.cli import (
    commands_catalog,
    commands_certs,
    commands_demo,
    commands_hf,
    commands_infer,
    commands_jobs,
    commands_k8s,
    commands_local,
    commands_pathways,
    commands_publish,
    commands_robotics,
    commands_serve,
)

# Command groups, in help order. Each module defines register(subparsers) and sets `func`.
COMMAND_MODULES = [
    commands_demo,
    commands_local,
    commands_serve,
    commands_catalog,
    commands_infer,
    commands_robotics,
    commands_pathways,
    commands_publish,
    commands_jobs,
    commands_k8s,
    commands_hf,
    commands_certs,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathways", description="Serve and train a language model as independent modules."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for m in COMMAND_MODULES:
        m.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        check_settings()  # a bad PATHWAYS_KERNELS: one line now, not a traceback at the first step
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (BackendError, ValueError, FileNotFoundError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"pathways {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
