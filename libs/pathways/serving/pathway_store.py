"""The gateway's pathway table changes, kept in a file so they outlive the gateway process.

A gateway starts from its checkpoint's spec; AddModule, SetPathway and RemovePathway change the
table while it runs. With a store (`--pathways-file`), every change is written (atomically) as
the difference from the checkpoint, and a restarted gateway applies it before serving:

    {"checkpoint": "/abs/ckpt",
     "modules": {"attn-2": {"kind": "attention", "config": {...}, "addresses": ["h:p"]}},
     "pathways": {"tiny-deep": ["embed", "attn-0", "attn-2", "head"]},
     "removed": ["tiny-shallow"]}

`pathways` holds pathways added or replaced; `removed` the checkpoint's pathways removed (a
pathway that was only added is simply dropped from `pathways`). A file written for another
checkpoint, or one that no longer applies to it, stops the gateway with an error naming the
file and the entry: serving a different table than the one recorded would be worse.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

VERSION = 1


class StoreError(ValueError):
    """A pathways file that cannot be read or applied; the message names the file and field."""


class PathwayStore:
    """The changes to a gateway's pathway table over checkpoint `checkpoint`, in file `path`."""

    def __init__(self, path: str | Path, checkpoint: str | Path, base_pathways):
        self.path, self.checkpoint = Path(path), str(Path(checkpoint).absolute())
        self.base = frozenset(base_pathways)  # the checkpoint's own pathways
        self.modules: dict[str, dict[str, Any]] = {}
        self.pathways: dict[str, list[str]] = {}
        self.removed: list[str] = []
        self._lock = threading.Lock()
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        where = str(self.path)
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{where}: not a readable JSON file ({e})") from None
        if not isinstance(data, dict):
            raise StoreError(f"{where}: expected an object; got {type(data).__name__}")
        if data.get("version", VERSION) != VERSION:
            raise StoreError(f"{where}: version: expected {VERSION}; got {data.get('version')!r}")
        if data.get("checkpoint") != self.checkpoint:
            raise StoreError(
                f"{where}: checkpoint: written for {data.get('checkpoint')!r}, not this gateway's "
                f"{self.checkpoint!r} (give another --pathways-file, or remove this one)"
            )
        modules, pathways = data.get("modules", {}), data.get("pathways", {})
        removed = data.get("removed", [])
        if not isinstance(modules, dict):
            raise StoreError(f"{where}: modules: expected an object")
        for name, m in modules.items():
            ok = (
                isinstance(m, dict)
                and isinstance(m.get("kind"), str)
                and isinstance(m.get("config"), dict)
                and _strings(m.get("addresses"))
                and m["addresses"]
            )
            if not ok:
                raise StoreError(
                    f"{where}: modules[{name!r}]: expected kind (a string), config (an object) "
                    f"and addresses (a non-empty list of strings)"
                )
        if not isinstance(pathways, dict):
            raise StoreError(f"{where}: pathways: expected an object")
        for name, chain in pathways.items():
            if not _strings(chain) or not chain:
                raise StoreError(f"{where}: pathways[{name!r}]: expected a list of module names")
        if not _strings(removed):
            raise StoreError(f"{where}: removed: expected a list of pathway names")
        self.modules, self.pathways, self.removed = modules, pathways, list(removed)

    def apply(self, executor) -> None:
        """Applies the recorded changes to `executor` (a RemoteExecutor over the checkpoint's
        spec): modules, then pathways, then removals."""
        from pathways.modules import config_from_dict

        where = str(self.path)
        for name, m in self.modules.items():
            try:
                cfg = config_from_dict({"kind": m["kind"], **m["config"]}, where=f"module {name!r}")
                executor.add_module(name, cfg, list(m["addresses"]))
            except ValueError as e:
                raise StoreError(f"{where}: modules[{name!r}]: {e}") from None
        for name, chain in self.pathways.items():
            try:
                executor.set_pathway(name, list(chain))
            except ValueError as e:
                raise StoreError(f"{where}: pathways[{name!r}]: {e}") from None
        for name in self.removed:
            if name in executor.spec.pathways:
                executor.remove_pathway(name)

    def added_module(self, name: str, kind: str, config: dict, addresses: list[str]) -> None:
        with self._lock:
            self.modules[name] = {"kind": kind, "config": config, "addresses": list(addresses)}
            self._write()

    def set_pathway(self, name: str, modules: list[str]) -> None:
        with self._lock:
            self.pathways[name] = list(modules)
            self.removed = [p for p in self.removed if p != name]
            self._write()

    def removed_pathway(self, name: str) -> None:
        with self._lock:
            self.pathways.pop(name, None)
            if name in self.base and name not in self.removed:
                self.removed.append(name)
            self._write()

    def _write(self) -> None:
        data = {
            "version": VERSION,
            "checkpoint": self.checkpoint,
            "modules": self.modules,
            "pathways": self.pathways,
            "removed": self.removed,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)  # a reader sees the old table or the new one


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
