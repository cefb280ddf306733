"""Pathway spec: named modules (kind + config) and named pathways (ordered module lists).

Loading checks the contract between neighbouring modules and raises `SpecError` with one message
naming the modules and values at fault. `plugins:` lists Python modules imported first: they
register module kinds defined outside the library, in every process that loads the spec (the
local executor, module servers, the gateway: all load it from the checkpoint).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from pathways import names
from pathways import placement as placement_lib
from pathways.config import ConfigError, to_dict
from pathways.modules import ModuleConfig, config_from_dict, registry
from pathways.placement import ModulePlacement


class SpecError(ValueError):
    """An invalid pathway spec; the message names the module/pathway and the values at fault."""


MASKS = ("causal", "bidirectional")


@dataclasses.dataclass(frozen=True)
class Pathway:
    name: str
    modules: tuple[str, ...]
    max_seq_len: int  # the smallest limit along the chain (or the declared, smaller one)
    # The attention mask of every call through this pathway (`mask:` in the spec): causal by
    # default for text, bidirectional for other inputs (an image's patches see each other).
    causal: bool = True
    # DiPaCo (`grid:` in the spec): module of this pathway -> its number of choices; a DiPaCo job
    # on this pathway trains every combination as a path (`pathways.parallel.dipaco.grid`)
    grid: tuple[tuple[str, int], ...] = ()


def default_mask(first: ModuleConfig) -> str:
    """The mask of a pathway that declares none: causal when it reads tokens or observations
    (a time step sees the steps before it), bidirectional otherwise (an image, an utterance)."""
    return "causal" if first.input_contract[0] in ("tokens", "observation") else "bidirectional"


@dataclasses.dataclass(frozen=True)
class PathwaySpec:
    modules: dict[str, ModuleConfig]
    pathways: dict[str, Pathway]
    tokenizer: dict[str, Any] = dataclasses.field(default_factory=lambda: {"kind": "byte"})
    plugins: tuple[str, ...] = ()  # Python modules that register the kinds of outside modules
    # Where modules run in Kubernetes (accelerators, nodes; `pathways.placement`); none: CPU.
    placement: dict[str, ModulePlacement] = dataclasses.field(default_factory=dict)

    def pathway(self, name: str) -> Pathway:
        if name not in self.pathways:
            raise SpecError(f"unknown pathway {name!r}; known: {', '.join(self.pathways)}")
        return self.pathways[name]

    @property
    def default_pathway(self) -> str:
        return next(iter(self.pathways))

    def to_dict(self) -> dict[str, Any]:
        pathways = {}
        for p in self.pathways.values():
            pathways[p.name] = {"modules": list(p.modules), "max_seq_len": p.max_seq_len}
            mask = MASKS[0] if p.causal else MASKS[1]
            if mask != default_mask(self.modules[p.modules[0]]):
                pathways[p.name]["mask"] = mask
            if p.grid:
                pathways[p.name]["grid"] = dict(p.grid)
        plugins = {"plugins": list(self.plugins)} if self.plugins else {}
        placement = (
            {"placement": {m: p.to_dict() for m, p in self.placement.items()}}
            if self.placement
            else {}
        )
        return {
            **plugins,
            "tokenizer": dict(self.tokenizer),
            "modules": {n: to_dict(c) for n, c in self.modules.items()},
            "pathways": pathways,
            **placement,
        }

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def with_module(self, name: str, cfg: ModuleConfig) -> PathwaySpec:
        """A copy with module `name` added; an existing module must keep its exact config."""
        _check_name(name, "module name")
        if name in self.modules and self.modules[name] != cfg:
            raise SpecError(f"module {name!r} already exists with a different config")
        return dataclasses.replace(self, modules={**self.modules, name: cfg})

    def with_pathway(self, name: str, modules: list[str]) -> PathwaySpec:
        """A copy with pathway `name` added or replaced (validated)."""
        data = self.to_dict()
        data["pathways"][name] = list(modules)
        return from_dict(data)

    def only(self, name: str) -> PathwaySpec:
        """A copy with pathway `name` alone and only the modules it runs: what a process that
        serves or evaluates one pathway of a larger spec builds (nothing else initialised)."""
        keep = self.pathway(name).modules
        return dataclasses.replace(
            self,
            modules={m: c for m, c in self.modules.items() if m in keep},
            pathways={name: self.pathways[name]},
            placement={m: p for m, p in self.placement.items() if m in keep},
        )

    def without_pathway(self, name: str) -> PathwaySpec:
        self.pathway(name)
        data = self.to_dict()
        del data["pathways"][name]
        return from_dict(data)


def load(path: str | Path) -> PathwaySpec:
    """Reads and validates a YAML spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"cannot read spec {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"spec {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return from_dict(data, source=str(path))


def from_dict(data: Any, source: str = "spec") -> PathwaySpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: top level must be a mapping with 'modules' and 'pathways'")
    unknown = sorted(
        set(data) - {"modules", "pathways", "tokenizer", "name", "plugins", "placement"}
    )
    if unknown:
        raise SpecError(f"{source}: unknown top-level key(s) {', '.join(unknown)}")
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list):
        raise SpecError(
            f"{source}: 'plugins' must be a list of Python module paths, got {plugins!r}"
        )
    try:
        registry.load_plugins(plugins)
    except ConfigError as e:
        raise SpecError(f"{source}: {e}") from None
    raw_modules = data.get("modules")
    if not isinstance(raw_modules, dict) or not raw_modules:
        raise SpecError(f"{source}: 'modules' must be a non-empty mapping of name -> config")
    modules: dict[str, ModuleConfig] = {}
    for name, raw in raw_modules.items():
        _check_name(str(name), "module name")
        if not isinstance(raw, dict):
            raise SpecError(f"module {name!r}: config must be a mapping, got {raw!r}")
        try:
            modules[str(name)] = config_from_dict(raw, where=f"module {name!r}")
        except (ConfigError, TypeError) as e:
            raise SpecError(str(e)) from None

    raw_pathways = data.get("pathways")
    if not isinstance(raw_pathways, dict) or not raw_pathways:
        raise SpecError(f"{source}: 'pathways' must be a non-empty mapping of name -> module list")
    pathways = {str(n): _pathway(str(n), raw, modules) for n, raw in raw_pathways.items()}

    tokenizer = data.get("tokenizer") or {"kind": "byte"}
    if not isinstance(tokenizer, dict) or tokenizer.get("kind") not in ("byte", "bpe"):
        raise SpecError(f"{source}: tokenizer.kind must be 'byte' or 'bpe', got {tokenizer!r}")
    try:
        placed = placement_lib.parse(data.get("placement"), modules)
    except placement_lib.PlacementError as e:
        raise SpecError(f"{source}: {e}") from None
    return PathwaySpec(
        modules=modules,
        pathways=pathways,
        tokenizer=dict(tokenizer),
        plugins=tuple(plugins),
        placement=placed,
    )


def _check_name(name, what: str) -> str:
    try:
        return names.check(name, what)
    except ValueError as e:
        raise SpecError(str(e)) from None


def _pathway(name: str, raw: Any, modules: dict[str, ModuleConfig]) -> Pathway:
    _check_name(name, "pathway name")
    declared_len, mask, grid = None, None, None
    if isinstance(raw, dict):
        declared_len, mask, grid = raw.get("max_seq_len"), raw.get("mask"), raw.get("grid")
        raw = raw.get("modules")
    if not isinstance(raw, list) or not raw:
        raise SpecError(f"pathway {name!r}: must be a non-empty list of module names, got {raw!r}")
    chain = [str(m) for m in raw]
    for m in chain:
        if m not in modules:
            raise SpecError(f"pathway {name!r}: unknown module {m!r}; known: {', '.join(modules)}")
    seen = set()
    for m in chain:
        if m in seen:
            raise SpecError(f"pathway {name!r}: module {m!r} appears more than once")
        seen.add(m)
    first, last = modules[chain[0]], modules[chain[-1]]
    if first.input_contract[0] == "hidden":
        raise SpecError(
            f"pathway {name!r}: must start with an embedding module (one that reads tokens, "
            f"images or audio), but {chain[0]!r} is {first.kind}"
        )
    if not registry.of(last).is_head:
        heads = ", ".join(k for k in registry.names() if registry.get(k).is_head)
        raise SpecError(
            f"pathway {name!r}: must end with a decoding module or another head ({heads}), "
            f"but {chain[-1]!r} is {last.kind}"
        )
    for a, b in zip(chain, chain[1:]):
        out_kind, out_dim = modules[a].output_contract
        in_kind, in_dim = modules[b].input_contract
        if out_kind != in_kind:
            raise SpecError(
                f"pathway {name!r}: {a!r} ({modules[a].kind}) outputs {out_kind} "
                f"but {b!r} ({modules[b].kind}) expects {in_kind}"
            )
        if out_dim != in_dim:
            raise SpecError(
                f"pathway {name!r}: d_model mismatch: {a!r} outputs {out_dim} "
                f"but {b!r} expects {in_dim}"
            )
    if last.output_contract[0] == "logits":  # next-token scores: over the tokens read
        if first.input_contract[0] != "tokens":
            raise SpecError(
                f"pathway {name!r}: {chain[-1]!r} ({last.kind}) predicts next tokens but "
                f"{chain[0]!r} ({first.kind}) reads {first.input_contract[0]}, not tokens"
            )
        emb_vocab, head_vocab = first.input_contract[1], last.output_contract[1]
        if emb_vocab != head_vocab:
            raise SpecError(
                f"pathway {name!r}: vocab mismatch: embedding {chain[0]!r} has "
                f"vocab_size {emb_vocab} but decoding {chain[-1]!r} has {head_vocab}"
            )
    if last.output_contract[0] == "actions" and first.input_contract[0] != "observation":
        raise SpecError(
            f"pathway {name!r}: {chain[-1]!r} ({last.kind}) outputs actions but "
            f"{chain[0]!r} ({first.kind}) reads {first.input_contract[0]}, not observations"
        )
    limits = {m: modules[m].max_seq_len for m in chain if hasattr(modules[m], "max_seq_len")}
    fixed = getattr(first, "output_length", None)  # e.g. an image's number of patches
    if fixed is not None:
        over = {m: v for m, v in limits.items() if v < fixed}
        if over:
            m, v = next(iter(over.items()))
            raise SpecError(
                f"pathway {name!r}: sequence length mismatch: {chain[0]!r} ({first.kind}) "
                f"outputs {fixed} positions but {m!r} has max_seq_len {v}"
            )
        limits[chain[0]] = fixed
    if not limits:
        raise SpecError(
            f"pathway {name!r}: no module bounds its sequence length (no max_seq_len or "
            f"output_length along {', '.join(chain)})"
        )
    max_len = min(limits.values())
    if declared_len is not None:
        if not isinstance(declared_len, int) or declared_len <= 0:
            raise SpecError(
                f"pathway {name!r}: max_seq_len must be a positive integer, "
                f"got {declared_len!r}"
            )
        over = {m: v for m, v in limits.items() if v < declared_len}
        if over:
            m, v = next(iter(over.items()))
            raise SpecError(
                f"pathway {name!r}: max sequence length exceeded: max_seq_len "
                f"{declared_len} > module {m!r} max_seq_len {v}"
            )
        max_len = declared_len
    if mask is None:
        mask = default_mask(first)
    if mask not in MASKS:
        raise SpecError(f"pathway {name!r}: mask must be one of {', '.join(MASKS)}; got {mask!r}")
    return Pathway(
        name=name,
        modules=tuple(chain),
        max_seq_len=max_len,
        causal=mask == MASKS[0],
        grid=_grid(name, grid, chain),
    )


def _grid(name: str, raw: Any, chain: list[str]) -> tuple[tuple[str, int], ...]:
    """A pathway's `grid:` (module -> choices >= 1, modules of the pathway, in the given order)."""
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        raise SpecError(
            f"pathway {name!r}: grid must map modules of the pathway to their number of "
            f"choices, e.g. {{attn-0: 2}}; got {raw!r}"
        )
    out = []
    for m, n in raw.items():
        if m not in chain:
            raise SpecError(f"pathway {name!r}: grid names {m!r}, which is not in the pathway")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SpecError(f"pathway {name!r}: grid[{m!r}] must be an integer >= 1, got {n!r}")
        out.append((str(m), n))
    return tuple(out)
