"""Import a Hugging Face folder as a Pathways checkpoint (any split into modules), and export back.

A checkpoint made here holds, besides spec.yaml and modules/, `hf_config.json`: the imported
config.json, so an export keeps the fields Pathways has no use for (token ids, dtype notes, ...).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import numpy as np
from flax import nnx

from pathways import checkpoint as ckpt
from pathways import modules as mod
from pathways import tokenizers
from pathways.hf import files, gpt2, llama
from pathways.hf.files import ConfigReader, HfFormatError
from pathways.spec import Pathway, PathwaySpec

FAMILIES: dict[str, ModuleType] = {gpt2.MODEL_TYPE: gpt2, llama.MODEL_TYPE: llama}
HF_CONFIG = "hf_config.json"


@dataclasses.dataclass
class Imported:
    """A Hugging Face model split into Pathways modules, parameters as nested numpy dicts."""

    spec: PathwaySpec
    params: dict[str, dict]  # module name -> pure dict, the layout of nnx.to_pure_dict
    hf_config: dict[str, Any]
    tokenizer: Path | None  # the folder's tokenizer.json, if it has one

    @property
    def pathway(self) -> str:
        return self.spec.default_pathway

    def states(self) -> dict[str, nnx.State]:
        """Module states for `LocalExecutor(spec, states)`, on device."""
        return {n: to_state(self.spec.modules[n], p) for n, p in self.params.items()}


def parse_split(text: str | None, n_layers: int) -> list[int]:
    """'6,6' -> [6, 6]; None -> one module with every layer. The parts must sum to n_layers."""
    if text is None:
        return [n_layers]
    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        raise ValueError(
            f"--split must be comma-separated layer counts like 6,6, got {text!r}"
        ) from None
    if any(p <= 0 for p in parts):
        raise ValueError(f"--split parts must be positive, got {text!r}")
    if sum(parts) != n_layers:
        raise ValueError(f"--split {text} sums to {sum(parts)} layers but the model has {n_layers}")
    return parts


def load_hf(
    folder: str | Path, split: str | list[int] | None = None, max_seq_len: int | None = None
) -> Imported:
    """Reads a local Hugging Face folder (never the network) into Pathways modules.

    Args:
        folder: holds config.json and model.safetensors (or sharded files with their index).
        split: layers per attention module ("6,6" or [6, 6]); default one module with all.
        max_seq_len: caps the context (and KV cache) of a RoPE model below its own limit.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HfFormatError(f"{folder}: not a directory")
    raw = files.read_config(folder)
    cr = ConfigReader(raw, folder / files.CONFIG)
    model_type = cr.get("model_type", str)
    if model_type not in FAMILIES:
        raise HfFormatError(
            f"{cr.path}: field 'model_type' = {model_type!r} is not supported "
            f"(supported: {', '.join(FAMILIES)})"
        )
    family = FAMILIES[model_type]
    try:
        emb, attn, dec, tied = family.configs(cr)
    except mod.ConfigError as e:
        raise HfFormatError(f"{cr.path}: {e}") from None
    if max_seq_len is not None:
        if emb.positions == "learned" and max_seq_len != emb.max_seq_len:
            raise ValueError(
                f"--max-seq-len applies to RoPE models only; {model_type} has a "
                f"learned table of {emb.max_seq_len} positions"
            )
        emb = dataclasses.replace(emb, max_seq_len=min(max_seq_len, emb.max_seq_len))
        attn = dataclasses.replace(attn, max_seq_len=emb.max_seq_len)
    parts = split if isinstance(split, list) else parse_split(split, attn.n_layers)
    if sum(parts) != attn.n_layers:
        raise ValueError(
            f"split {parts} sums to {sum(parts)} layers but the model has {attn.n_layers}"
        )

    tensors = files.Tensors(folder)
    emb_p, layers, dec_p = family.read(tensors, emb, attn, dec, tied)
    tensors.check_all_taken(ignore=family.IGNORED)

    modules: dict[str, mod.ModuleConfig] = {"embed": emb}
    params: dict[str, dict] = {"embed": emb_p}
    first = 0
    for i, n in enumerate(parts):
        name = f"attn-{i}"
        modules[name] = dataclasses.replace(attn, n_layers=n)
        params[name] = {"blocks": {j: layers[first + j] for j in range(n)}}
        first += n
    modules["head"], params["head"] = dec, dec_p
    tok_path = folder / files.TOKENIZER
    tokenizer = {"kind": "bpe", "path": files.TOKENIZER} if tok_path.is_file() else {"kind": "byte"}
    pathway = Pathway(model_type, tuple(modules), attn.max_seq_len)
    spec = PathwaySpec(modules=modules, pathways={model_type: pathway}, tokenizer=tokenizer)
    return Imported(spec, params, raw, tok_path if tok_path.is_file() else None)


def to_state(cfg: mod.ModuleConfig, pure: dict) -> nnx.State:
    """Fills a module's state from a pure dict, checking every leaf's shape against `cfg`."""
    state = nnx.state(nnx.eval_shape(lambda: mod.build(cfg)))
    want = nnx.to_pure_dict(state)
    if jax.tree.structure(want) != jax.tree.structure(pure):
        raise ValueError(f"{cfg.kind} parameters do not match the module's structure")
    for (path, w), got in zip(jax.tree.leaves_with_path(want), jax.tree.leaves(pure)):
        if tuple(w.shape) != tuple(np.shape(got)):
            raise ValueError(
                f"{cfg.kind} parameter {jax.tree_util.keystr(path)}: shape "
                f"{np.shape(got)}, expected {w.shape}"
            )
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, pure))
    return state


def import_hf(
    folder: str | Path,
    out: str | Path,
    split: str | list[int] | None = None,
    max_seq_len: int | None = None,
) -> Imported:
    """`load_hf`, then writes the Pathways checkpoint to `out`."""
    imported = load_hf(folder, split, max_seq_len)
    out = _empty_dir(out)
    if imported.tokenizer is not None:
        tokenizers.BpeTokenizer.load(imported.tokenizer)  # fail now on a malformed file
        shutil.copyfile(imported.tokenizer, out / files.TOKENIZER)
    for name, state in imported.states().items():
        ckpt.save_module(out, name, state)
    (out / HF_CONFIG).write_text(json.dumps(imported.hf_config, indent=2) + "\n")
    imported.spec.dump(out / "spec.yaml")
    return imported


def _empty_dir(path: str | Path) -> Path:
    """Creates `path`, refusing one with files in it: stale modules or shards would mix in."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not empty; choose a new directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _family_of(spec: PathwaySpec, pathway: str):
    """(family, embedding name, attention names, decoding name) of an exportable pathway."""
    chain = spec.pathway(pathway).modules
    cfgs = [spec.modules[m] for m in chain]
    kinds = [c.kind for c in cfgs]
    # The families map exactly these three config types' parameters.
    shape = (mod.EmbeddingConfig, *[mod.AttentionConfig] * (len(cfgs) - 2), mod.DecodingConfig)
    if len(cfgs) < 3 or not all(isinstance(c, t) for c, t in zip(cfgs, shape)):
        raise ValueError(
            f"pathway {pathway!r} is {' -> '.join(kinds)}; export needs embedding -> "
            f"attention... -> decoding"
        )
    attn = cfgs[1]
    for name, c in zip(chain[2:-1], cfgs[2:-1]):
        diff = [
            f.name
            for f in dataclasses.fields(c)
            if f.name != "n_layers" and getattr(c, f.name) != getattr(attn, f.name)
        ]
        if diff:
            raise ValueError(
                f"module {name!r} differs from {chain[1]!r} in {', '.join(diff)}; "
                f"a Hugging Face model has one layer shape"
            )
    reasons = []
    for family in FAMILIES.values():
        why = family.matches(cfgs[0], attn, cfgs[-1])
        if why is None:
            return family, chain[0], list(chain[1:-1]), chain[-1]
        reasons.append(f"not {family.MODEL_TYPE}: {why}")
    raise ValueError(f"pathway {pathway!r} matches no exportable family ({'; '.join(reasons)})")


def load_params(directory: Path, spec: PathwaySpec, names: list[str]) -> dict[str, dict]:
    """Module parameters of a checkpoint as nested numpy dicts."""
    out = {}
    for name in names:
        if not ckpt.has_module(directory, name):
            raise FileNotFoundError(f"checkpoint {directory} has no weights for module {name!r}")
        like = nnx.state(nnx.eval_shape(lambda c=spec.modules[name]: mod.build(c)))
        out[name] = jax.tree.map(
            np.asarray, nnx.to_pure_dict(ckpt.load_module(directory, name, like))
        )
    return out


def export_hf(directory: str | Path, out: str | Path, pathway: str | None = None) -> Path:
    """Writes a checkpoint's pathway as a Hugging Face folder (model.safetensors + config.json)."""
    directory, out = Path(directory), Path(out)
    spec, _ = ckpt.load_spec(directory)
    pathway = pathway or spec.default_pathway
    family, emb_name, attn_names, dec_name = _family_of(spec, pathway)
    params = load_params(directory, spec, [emb_name, *attn_names, dec_name])
    layers = [params[n]["blocks"][j] for n in attn_names for j in range(len(params[n]["blocks"]))]
    base_path = directory / HF_CONFIG
    base = json.loads(base_path.read_text()) if base_path.is_file() else {}
    emb_p, dec_p = params[emb_name], params[dec_name]
    # Tied only where the head still equals the embedding bit for bit (training may untie them).
    same = np.array_equal(dec_p["head"]["kernel"].T, emb_p["tokens"]["embedding"])
    tied = same and base.get("tie_word_embeddings", True)
    attn = spec.modules[attn_names[0]]
    config = family.hf_config(spec.modules[emb_name], attn, len(layers), tied, base)
    for key in ("torch_dtype", "dtype"):  # the weights are written as float32
        if key in config:
            config[key] = "float32"
    _empty_dir(out)
    files.write_safetensors(out / files.WEIGHTS, family.write(emb_p, layers, dec_p, tied))
    files.write_config(out / files.CONFIG, config)
    if spec.tokenizer.get("kind") == "bpe":
        src = directory / spec.tokenizer.get("path", files.TOKENIZER)
        if src.is_file():
            shutil.copyfile(src, out / files.TOKENIZER)
    return out
