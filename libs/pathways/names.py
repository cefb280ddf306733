"""Names of modules and pathways: what they may look like, checked wherever one comes in.

A module's name becomes a directory of a checkpoint (`modules/<name>`), a Kubernetes object
name and a metric label; a pathway's name travels in RPCs. So a name is a plain token: a letter
or digit, then letters, digits, '_', '.' or '-', never '..' (a spec naming a module
`../../victim` once replaced a directory outside its checkpoint).
"""

from __future__ import annotations

import re

PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_LENGTH = 128


def check(name, what: str = "name") -> str:
    """Returns `name` if it is a valid module/pathway name, else raises ValueError naming
    `what` and the value."""
    if not isinstance(name, str) or not PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{what} must match {PATTERN.pattern} (letters, digits, '_', '.', '-'; no '..'); "
            f"got {name!r:.80}"
        )
    if len(name) > MAX_LENGTH:
        raise ValueError(f"{what} has {len(name)} characters; at most {MAX_LENGTH}")
    return name
