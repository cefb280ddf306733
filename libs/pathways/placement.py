"""Where a module runs in Kubernetes: the spec's `placement:` section.

A module with no entry runs on CPU with the render's default resources. An entry may ask for
accelerators and say where they are; the render turns it into the module's pod resources,
node selector and tolerations, and a module with several devices gets a tensor-parallel mesh
over them (`PATHWAYS_MESH=tp=N`, see `pathways.sharding`):

    placement:
      attn-0:
        accelerator: nvidia.com/gpu       # or amd.com/gpu, google.com/tpu
        count: 4                          # devices per pod: mesh tp=4
        node_selector: {cloud.google.com/gke-accelerator: nvidia-h100-80gb}
        tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
        memory: 64Gi                      # optional: the pod's memory (request = limit)
        cpu: "8"                          # optional: the pod's CPUs (request = limit)
        image: registry.example/pathways/module-server-cuda:1.0   # a JAX build for the device

CPU-only and accelerator modules mix in one pathway; placement never changes what a module
computes, only where.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from pathways.config import unknown_fields

ACCELERATORS = ("nvidia.com/gpu", "amd.com/gpu", "google.com/tpu")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")


class PlacementError(ValueError):
    """A bad `placement:` entry; the message names the module, the field and the value."""


@dataclasses.dataclass(frozen=True)
class ModulePlacement:
    accelerator: str = ""  # "": CPU only
    count: int = 1  # devices per pod (with an accelerator)
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[tuple[tuple[str, Any], ...], ...] = ()
    memory: str = ""
    cpu: str = ""
    image: str = ""

    @property
    def mesh(self) -> str:
        """The module server's mesh setting: tp over the pod's devices ("" for one or none)."""
        return f"tp={self.count}" if self.accelerator and self.count > 1 else ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.accelerator:
            out["accelerator"], out["count"] = self.accelerator, self.count
        if self.node_selector:
            out["node_selector"] = dict(self.node_selector)
        if self.tolerations:
            out["tolerations"] = [dict(t) for t in self.tolerations]
        for f in ("memory", "cpu", "image"):
            if getattr(self, f):
                out[f] = getattr(self, f)
        return out


def parse(raw: Any, modules) -> dict[str, ModulePlacement]:
    """The `placement:` section (module -> entry) for a spec with `modules`."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PlacementError(f"placement must be a mapping of module -> entry, got {raw!r}")
    return {str(m): _entry(str(m), entry, modules) for m, entry in raw.items()}


def _entry(module: str, raw: Any, modules) -> ModulePlacement:
    where = f"placement of module {module!r}"
    if module not in modules:
        raise PlacementError(f"{where}: no such module; modules: {', '.join(modules)}")
    if not isinstance(raw, dict):
        raise PlacementError(f"{where}: must be a mapping, got {raw!r}")
    unknown = unknown_fields(ModulePlacement, raw)
    if unknown:
        known = [f.name for f in dataclasses.fields(ModulePlacement)]
        raise PlacementError(
            f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    accelerator = str(raw.get("accelerator") or "")
    if accelerator and accelerator not in ACCELERATORS:
        raise PlacementError(
            f"{where}: accelerator must be one of {', '.join(ACCELERATORS)}; got {accelerator!r}"
        )
    count = raw.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise PlacementError(f"{where}: count must be an integer >= 1, got {count!r}")
    if count > 1 and not accelerator:
        raise PlacementError(f"{where}: count {count} needs an accelerator")
    selector = raw.get("node_selector") or {}
    if not isinstance(selector, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
    ):
        raise PlacementError(f"{where}: node_selector must map strings to strings: {selector!r}")
    tolerations = raw.get("tolerations") or []
    allowed = {"key", "operator", "value", "effect", "tolerationSeconds"}
    if not isinstance(tolerations, list) or not all(
        isinstance(t, dict) and t and set(t) <= allowed for t in tolerations
    ):
        raise PlacementError(
            f"{where}: tolerations must be a list of mappings with fields among "
            f"{', '.join(sorted(allowed))}; got {tolerations!r}"
        )
    for field in ("memory", "cpu"):
        value = raw.get(field)
        if value is not None and not _QUANTITY.match(str(value)):
            raise PlacementError(
                f"{where}: {field} must be a Kubernetes quantity such as 8, 500m or 16Gi; "
                f"got {value!r}"
            )
    return ModulePlacement(
        accelerator=accelerator,
        count=count,
        node_selector=tuple(sorted(selector.items())),
        tolerations=tuple(tuple(sorted(t.items())) for t in tolerations),
        memory=str(raw.get("memory") or ""),
        cpu=str(raw.get("cpu") or ""),
        image=str(raw.get("image") or ""),
    )
