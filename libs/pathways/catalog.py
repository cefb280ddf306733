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
    return {
        "name": p.name,
        "modules": list(p.modules),
        "parameters": sum(n for n, _ in sizes),
        "weight_bytes": sum(b for _, b in sizes),
        "max_seq_len": p.max_seq_len,
        "tokens_per_s": _number(got, "tokens_per_s"),
        "eval_loss": _number(got, "eval_loss"),
    }


def _number(values: dict[str, Any], key: str) -> float | None:
    v = values.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def family_entry(
    spec, family: str, paths: list[str], measured: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A routed family's catalog entry (a DiPaCo checkpoint's paths under the name a request
    uses to be routed): its `paths`, no modules of its own, the parameters and context of what
    one request may run (the largest path, the shortest context), the weight bytes of every
    path's modules (each counted once), and the family's own measurements if stored."""
    if not paths:
        raise ValueError(f"routed family {family!r} has no served paths")
    each = [entry(spec, p, measured) for p in paths]
    modules = {m for p in paths for m in spec.pathway(p).modules}
    got = (measured or {}).get(family, {})
    return {
        "name": family,
        "modules": [],
        "parameters": max(e["parameters"] for e in each),
        "weight_bytes": sum(module_size(spec.modules[m])[1] for m in sorted(modules)),
        "max_seq_len": min(e["max_seq_len"] for e in each),
        "tokens_per_s": _number(got, "tokens_per_s"),
        "eval_loss": _number(got, "eval_loss"),
        "paths": list(paths),
    }


def measure(
    executor, pathway: str, tokenizer, data, *, tokens: int = 32, seq_len: int = 64
) -> dict:
    """Measures `pathway` in this process (LocalExecutor): `tokens_per_s` of one greedy session
    (a 4-token prompt, prefill included, after an untimed run that compiles) and `eval_loss`
    (mean cross-entropy, nats, on `data`'s eval split: evaluation.eval_loss, 4 batches of 8)."""
    import time

    from pathways import evaluation
    from pathways.generate import greedy_ids

    if tokens < 1:
        raise ValueError(f"tokens must be >= 1; got {tokens}")
    p = executor.spec.pathway(pathway)
    prompt = (tokenizer.encode("def ") or [0])[:4]
    tokens = min(tokens, p.max_seq_len - len(prompt))
    greedy_ids(executor, pathway, prompt, tokens)  # compiles
    t0 = time.perf_counter()
    greedy_ids(executor, pathway, prompt, tokens)
    rate = tokens / (time.perf_counter() - t0)
    loss = evaluation.eval_loss(executor, pathway, data, seq_len=min(seq_len, p.max_seq_len - 1))
    return {"tokens_per_s": rate, "eval_loss": loss, "decode_tokens": tokens, "seq_len": seq_len}


class NoPathway(ValueError):
    """No pathway meets the constraints; `param` names the constraint that ruled the last out."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def choose(pathways, max_ms_per_token: float | None = None, max_parameters: int | None = None):
    """The best of `pathways` (objects with name, parameters, tokens_per_s, eval_loss) that meets
    the constraints: the lowest measured eval loss, else (none measured) the most parameters.
    A latency bound admits only pathways whose tokens/s was measured."""
    fits, why = [], None
    for p in pathways:
        if max_parameters is not None and p.parameters > max_parameters:
            why = why or "max_parameters"
            continue
        if max_ms_per_token is not None and (
            not p.tokens_per_s or 1e3 / p.tokens_per_s > max_ms_per_token
        ):
            why = "max_ms_per_token"
            continue
        fits.append(p)
    if not fits:
        seen = "; ".join(
            f"{p.name}: {p.parameters:,} parameters, "
            + (f"{1e3 / p.tokens_per_s:.1f} ms/token" if p.tokens_per_s else "not measured")
            for p in pathways
        )
        param = why or "model"
        raise NoPathway(f"no pathway meets the constraints ({seen})", param)
    measured = [p for p in fits if p.eval_loss is not None]
    if measured:
        return min(measured, key=lambda p: (p.eval_loss, p.parameters))
    return max(fits, key=lambda p: p.parameters)
