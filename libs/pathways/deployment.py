"""The running local deployment's addresses, so that later commands find it.

`pathways up` writes them to $PATHWAYS_HOME/deployment.json (default ~/.pathways) and removes the
file when it stops; `pathways generate --gateway`, `train --remote` and `jobs` read it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def state_file() -> Path:
    return Path(os.environ.get("PATHWAYS_HOME", Path.home() / ".pathways")) / "deployment.json"


def write(info: dict[str, Any]) -> Path:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "pid": os.getpid()}, indent=1))
    tmp.replace(path)
    return path


def read() -> dict[str, Any] | None:
    """The deployment's addresses, or None when none is running (stale files are ignored)."""
    path = state_file()
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(info.get("pid", -1)), 0)
    except (OSError, ValueError):
        return None  # its `pathways up` is gone
    return info


def remove() -> None:
    path = state_file()
    info = None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    if info and info.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def broker_url(explicit: str | None = None) -> str:
    """--broker, else $PATHWAYS_BROKER_URL, else the running local deployment's broker."""
    if explicit:
        return explicit
    if os.environ.get("PATHWAYS_BROKER_URL"):
        return os.environ["PATHWAYS_BROKER_URL"]
    info = read()
    if info and info.get("broker"):
        return info["broker"]
    raise ValueError("no coordinator found: start one with `pathways up`, or pass --broker URL "
                     "(or set PATHWAYS_BROKER_URL)")
