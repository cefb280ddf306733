"""Checkpoints: one Orbax tree per module, plus the spec, the tokenizer and training state.

Layout of a checkpoint directory:
    spec.yaml             the pathway spec (modules + pathways)
    tokenizer.json        only for BPE tokenizers
    modules/<name>/       each module's parameters (independently loadable)
    train/<name>/         each module's optimizer state (optional)
    train/meta.json       step and training settings (optional)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from pathways import modules as mod
from pathways import names, tokenizers
from pathways import spec as spec_lib

_checkpointer = None
# One Orbax checkpointer per process, and it is not safe for concurrent saves from threads.
_lock = threading.Lock()


def _ckpt():
    global _checkpointer
    if _checkpointer is None:
        import orbax.checkpoint as ocp  # slow import: only when checkpoints are touched

        _checkpointer = ocp.StandardCheckpointer()
    return _checkpointer


def _to_host(tree):
    return jax.tree.map(np.asarray, tree)


def save_tree(path: Path, tree: Any) -> None:
    path = Path(path).absolute()
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with _lock:
        _ckpt().save(tmp, tree)
        _ckpt().wait_until_finished()
    # Replace atomically enough: a crash leaves either the old tree or the .tmp, never half a tree.
    if path.exists():
        old = path.with_name(path.name + ".old")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)


def load_tree(path: Path, like: Any) -> Any:
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint tree {path} does not exist")
    with _lock:
        return _ckpt().restore(path, like)


def module_dir(directory: str | Path, name: str) -> Path:
    """Where module `name` lives in a checkpoint; a name that could leave it is refused."""
    return Path(directory) / "modules" / names.check(name, "module name")


def save_module(directory: str | Path, name: str, state) -> None:
    save_tree(module_dir(directory, name), nnx.to_pure_dict(state))


def load_module(directory: str | Path, name: str, like_state):
    """Restores a module's parameters into the structure of `like_state` (an nnx.State)."""
    pure = load_tree(module_dir(directory, name), nnx.to_pure_dict(like_state))
    state = jax.tree.map(lambda x: x, like_state)  # a copy to fill
    nnx.replace_by_pure_dict(state, pure)
    return state


def restore_module(directory: str | Path, name: str, cfg) -> nnx.State:
    """Module `name`'s parameters (an nnx.State of `cfg`'s module) read straight into the
    module's abstract shapes (`modules.abstract`): no parameters are initialised first, so the
    process holds one copy of the weights, not random ones beside the checkpoint's (a module
    server's start: ~2x the weights before). `modules.from_state(cfg, state)` makes the module."""
    like = nnx.state(mod.abstract(cfg))
    path = module_dir(directory, name)
    try:
        return load_module(directory, name, like)
    except (ValueError, KeyError) as e:  # Orbax: a tree of another structure or shape
        if not path.exists():
            raise
        raise ValueError(
            f"checkpoint {path} does not hold parameters of module {name!r} as configured "
            f"({type(cfg).__name__}): {e}"
        ) from None


def save_spec(directory: str | Path, spec: spec_lib.PathwaySpec, tokenizer) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok_cfg = tokenizer.save(directory)
    dataclasses.replace(spec, tokenizer=tok_cfg).dump(directory / "spec.yaml")


def load_spec(directory: str | Path):
    """Returns (spec, tokenizer) of a checkpoint directory."""
    directory = Path(directory)
    if not (directory / "spec.yaml").exists():
        raise FileNotFoundError(f"{directory} is not a Pathways checkpoint (no spec.yaml)")
    spec = spec_lib.load(directory / "spec.yaml")
    return spec, tokenizers.load(spec.tokenizer, directory)


def has_module(directory: str | Path, name: str) -> bool:
    return module_dir(directory, name).exists()


def write_meta(directory: str | Path, meta: dict) -> None:
    path = Path(directory) / "train" / "meta.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)


def read_meta(directory: str | Path) -> dict | None:
    path = Path(directory) / "train" / "meta.json"
    return json.loads(path.read_text()) if path.exists() else None


def truncate_records(path: str | Path, key: str, last: int) -> None:
    """Keeps the JSON-lines records of `path` whose `key` is <= `last` (on resume: the records
    after the checkpoint are about to be written again). Replaced atomically; no file, no-op."""
    path = Path(path)
    if path.exists():
        keep = [
            line for line in path.read_text().splitlines() if line and json.loads(line)[key] <= last
        ]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)
