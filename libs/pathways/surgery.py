"""Pathway surgery: insert an attention module without changing the function, or remove one.

An inserted module has zero-initialised residual output projections (attention `o` and MLP
`down`), so each of its blocks adds exactly zero to the residual stream: the pathway's logits are
bit-for-bit those of the pathway before the insertion. Training then moves only the new module
(`LocalTrainer(..., trainable={name})`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from pathways import modules as mod
from pathways.config import to_dict
from pathways.modules import registry
from pathways.modules.attention import AttentionConfig
from pathways.spec import PathwaySpec, SpecError, from_dict


def _chain(spec: PathwaySpec, pathway: str) -> list[str]:
    return list(spec.pathway(pathway).modules)


def _with(
    spec: PathwaySpec, pathway: str, chain: list[str], modules: dict[str, Any] | None = None
) -> PathwaySpec:
    data = spec.to_dict()
    if modules is not None:
        data["modules"] = modules
        if "placement" in data:  # a module dropped from the table takes its placement along
            data["placement"] = {m: p for m, p in data["placement"].items() if m in modules}
    # The declared limit is dropped: it is recomputed from the modules now on the chain.
    data["pathways"][pathway] = list(chain)
    return from_dict(data)


def default_attention(spec: PathwaySpec, pathway: str, *, n_layers: int = 1) -> AttentionConfig:
    """A config for a new module: the shape of the pathway's first attention module.

    Falls back to one head per 64 channels when the pathway has no attention module yet.
    """
    chain = _chain(spec, pathway)
    like = next((c for m in chain if isinstance(c := spec.modules[m], AttentionConfig)), None)
    if like is not None:
        return dataclasses.replace(like, n_layers=n_layers, zero_init_output=True)
    d = spec.modules[chain[0]].output_contract[1]
    return AttentionConfig(
        d_model=d,
        n_layers=n_layers,
        n_heads=max(1, d // 64),
        max_seq_len=spec.pathway(pathway).max_seq_len,
        zero_init_output=True,
    )


def insert_attention(
    spec: PathwaySpec,
    pathway: str,
    name: str,
    position: int,
    cfg: AttentionConfig | None = None,
    *,
    seed: int = 0,
):
    """Inserts a new attention module `name` so that it becomes the pathway's `position`-th module.

    Args:
        spec: the spec holding `pathway`.
        pathway: the pathway to grow (other pathways are unchanged).
        name: the new module's name (must be new to the spec).
        position: index in the pathway's module list, 1 (right after the embedding) to
            len(modules) - 1 (right before the decoding module).
        cfg: the new module's shape; default: `default_attention`. Its `zero_init_output` is
            forced on, and stays on in the spec, so a server that builds the module from the spec
            alone also starts from the identity.
        seed: initialisation seed of the new module's non-zero parameters.

    Returns:
        (new spec, the new module's initial nnx.State). The new module is appended to the spec's
        module table, so `LocalExecutor` seeds of the existing modules do not shift.
    """
    chain = _chain(spec, pathway)
    if name in spec.modules:
        raise SpecError(f"module {name!r} already exists in the spec")
    if not 1 <= position <= len(chain) - 1:
        raise SpecError(
            f"pathway {pathway!r}: insert position must be between 1 (after "
            f"{chain[0]!r}) and {len(chain) - 1} (before {chain[-1]!r}), got {position}"
        )
    cfg = cfg or default_attention(spec, pathway)
    identity = registry.of(cfg).identity
    if identity is None:
        raise SpecError(
            f"only modules that can start as the identity can be inserted, got a {cfg.kind} config"
        )
    cfg = identity(cfg)
    modules = {n: to_dict(c) for n, c in spec.modules.items()}
    modules[name] = to_dict(cfg)
    new_spec = _with(spec, pathway, chain[:position] + [name] + chain[position:], modules)
    _, state = nnx.split(mod.build(cfg, seed=seed))
    return new_spec, state


def remove_module(
    spec: PathwaySpec, pathway: str, name: str, *, drop_unused: bool = False
) -> PathwaySpec:
    """Removes attention module `name` from `pathway`.

    Args:
        drop_unused: also delete the module from the spec's module table when no pathway uses it
            any more (default: keep it, so its parameters can be put back).
    """
    chain = _chain(spec, pathway)
    if name not in chain:
        raise SpecError(f"pathway {pathway!r} has no module {name!r}; it has {', '.join(chain)}")
    cfg = spec.modules[name]
    if (cfg.input_contract[0], cfg.output_contract[0]) != ("hidden", "hidden"):
        raise SpecError(
            f"only hidden -> hidden modules can be removed; {name!r} is "
            f"{cfg.kind} (a pathway must start with an embedding "
            f"and end with a decoding module)"
        )
    new_chain = [m for m in chain if m != name]
    modules = None
    if drop_unused and not any(name in p.modules for n, p in spec.pathways.items() if n != pathway):
        modules = {n: to_dict(c) for n, c in spec.modules.items() if n != name}
    return _with(spec, pathway, new_chain, modules)


def removal_effect(executor, pathway: str, name: str, data, **eval_kw) -> dict[str, Any]:
    """Removes `name` from `pathway` and measures the eval loss before and after on the same
    batches (`eval_kw` as `evaluation.eval_loss`).

    Returns:
        {"spec": the new spec, "before", "after", "delta": after - before} (losses in nats).
    """
    from pathways.evaluation import eval_loss
    from pathways.executor.local import LocalExecutor

    new_spec = remove_module(executor.spec, pathway, name)
    after_ex = LocalExecutor(new_spec, states={n: executor.state(n) for n in new_spec.modules})
    before = eval_loss(executor, pathway, data, **eval_kw)
    after = eval_loss(after_ex, pathway, data, **eval_kw)
    return {"spec": new_spec, "before": before, "after": after, "delta": after - before}
