"""Module kinds by name: the built-in ones register themselves; plugins add more.

Code around modules resolves a config's kind once (`of(cfg)`) and asks the `Kind` object;
no one else compares kind names.
"""

from __future__ import annotations

import importlib
from typing import Any

from pathways.config import ConfigError
from pathways.modules.kind import Kind

_KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Adds `kind`. The same definition imported again (a plugin reached under a second module
    path) replaces it; another definition under a taken name is an error."""
    have = _KINDS.get(kind.name)
    if have is not None and _origin(have) != _origin(kind):
        raise ValueError(
            f"kind {kind.name!r} is already registered by {_origin(have)[0]}; "
            f"{_origin(kind)[0]} registers another"
        )
    _KINDS[kind.name] = kind
    return kind


def _origin(kind: Kind) -> tuple[str, str]:
    return kind.config.__qualname__, kind.module.__qualname__


def get(name: Any) -> Kind:
    """The kind called `name`; ConfigError naming the known ones otherwise."""
    kind = _KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ConfigError(
            f"kind must be one of {', '.join(_KINDS)}; got {name!r} (a kind defined outside "
            f"the library is registered by a module listed in the spec's plugins)"
        )
    return kind


def of(cfg: Any) -> Kind:
    """The kind of a module config."""
    return get(cfg.kind)


def names() -> tuple[str, ...]:
    return tuple(_KINDS)


def load_plugins(paths: list[str] | tuple[str, ...]) -> None:
    """Imports each Python module in `paths`; importing one registers the kinds it defines.

    Raises:
        ConfigError: a path that is not a dotted module name or cannot be imported, named.
    """
    for path in paths:
        if not isinstance(path, str) or not all(p.isidentifier() for p in path.split(".")):
            raise ConfigError(f"plugin {path!r} must be a dotted Python module path")
        try:
            importlib.import_module(path)
        except Exception as e:  # noqa: BLE001 - any failure to import is the plugin's
            raise ConfigError(
                f"plugin {path!r} cannot be imported: {type(e).__name__}: {e}"
            ) from None
