"""The pathway catalog: what each pathway of a checkpoint costs (modules, parameters, weight
memory, longest context) and, once `pathways bench-pathways` has measured it, how fast it decodes
and how well it predicts (`catalog.json` in the checkpoint)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

MEASURED = "catalog.json"  # {"pathways": {NAME: {"tokens_per_s": x, "eval_loss": y, ...}}}


@functools.lru_cache(maxsize=256)
def module_size(cfg) -> tuple[int, int]:
    """(parameters, bytes) of a module config, from shapes only (nothing allocated)."""
    import jax
    from flax import nnx

    from pathways import modules as mod

    shapes = nnx.eval_shape(lambda: mod.build(cfg))
    leaves = jax.tree.leaves(nnx.state(shapes))
    return sum(x.size for x in leaves), sum(x.size * x.dtype.itemsize for x in leaves)


def read_measured(checkpoint: str | Path | None) -> dict[str, dict[str, Any]]:
    """The measurements stored in `checkpoint` per pathway ({} when none or unreadable)."""
    if checkpoint is None:
        return {}
    try:
        data = json.loads((Path(checkpoint) / MEASURED).read_text())
    except (OSError, ValueError):
        return {}
    pathways = data.get("pathways") if isinstance(data, dict) else None
    return pathways if isinstance(pathways, dict) else {}


def write_measured(checkpoint: str | Path, pathway: str, values: dict[str, Any]) -> Path:
    """Stores `values` (tokens_per_s, eval_loss, ...) for `pathway`, keeping the others."""
    path = Path(checkpoint) / MEASURED
    data = {"pathways": read_measured(checkpoint)}
    data["pathways"][pathway] = dict(values)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def entry(spec, name: str, measured: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One pathway's catalog entry: name, modules, parameters, weight_bytes (float32),
    max_seq_len, and tokens_per_s / eval_loss when measured (else None)."""
    p = spec.pathway(name)
    sizes = [module_size(spec.modules[m]) for m in p.modules]
    got = (measured or {}).get(name, {})

    def number(key):
        v = got.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    return {
        "name": p.name,
        "modules": list(p.modules),
        "parameters": sum(n for n, _ in sizes),
        "weight_bytes": sum(b for _, b in sizes),
        "max_seq_len": p.max_seq_len,
        "tokens_per_s": number("tokens_per_s"),
        "eval_loss": number("eval_loss"),
    }
