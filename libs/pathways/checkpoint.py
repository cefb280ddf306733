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

from pathways import cpu, names, tokenizers
from pathways import modules as mod
from pathways import spec as spec_lib

_checkpointer = None
_partial = None  # the checkpointer of partial restores (`_restore_partial`)
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


STREAM_CHUNK_BYTES = 16 << 20  # per read: ~20 ms of Orbax's per call against memory


def stream_module(directory: str | Path, name: str, cfg, chunk_bytes: int | None = None):
    """Module `name`'s parameters read a few arrays at a time: yields (key path in the
    module's nnx.State, float32 numpy array) in the order `jax.tree.flatten` gives the state's
    leaves, each read of the checkpoint holding at most `chunk_bytes` (or one array, where an
    array is larger). A caller that converts each array and drops it (bfloat16/int8 storage:
    `ModuleRuntime.load_serving`) never holds the module's float32 weights whole.

    Problems are found before the first array is yielded: a missing tree is FileNotFoundError,
    one of another structure or shape ValueError, as for `restore_module`."""
    leaves = check_module(directory, name, cfg)
    path = module_dir(directory, name).absolute()
    chunk_bytes = STREAM_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    groups, group, size = [], [], 0
    for p, x in leaves:
        n = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        if group and size + n > chunk_bytes:
            groups.append(group)
            group, size = [], 0
        group.append((p, x))
        size += n
    groups.append(group)
    for group in groups:
        item: dict = {}
        for p, x in group:
            *parents, last = _pure_keys(p)
            node = item
            for k in parents:
                node = node.setdefault(k, {})
            node[last] = jax.ShapeDtypeStruct(x.shape, x.dtype)
        read = _restore_partial(path, item)
        del item
        for p, _ in group:
            *parents, last = _pure_keys(p)
            node = read
            for k in parents:
                node = node[k]
            x, node[last] = node[last], None  # the caller's reference is the last one
            yield p, x
            del x
        del read
        # What the read and the caller's conversions freed goes back to the OS before the next
        # read: glibc keeps freed blocks below its mmap threshold (up to 32 MB) in its arenas
        # otherwise, and each read would add its own to the peak.
        cpu.release_free_memory()


def check_module(directory: str | Path, name: str, cfg) -> list:
    """Checks that the checkpoint holds module `name`'s parameters as `cfg` shapes them,
    reading only the tree's metadata (FileNotFoundError, ValueError naming the first
    difference); returns the module's abstract leaves with their key paths."""
    path = module_dir(directory, name).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint tree {path} does not exist")
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(mod.abstract(cfg)))[0]
    _check_shapes(path, name, cfg, [(_pure_keys(p), x) for p, x in leaves])
    return leaves


def _pure_keys(path) -> list:
    """A key path of an nnx.State leaf as the keys of its `nnx.to_pure_dict` (no `.value`)."""
    return [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]


def _check_shapes(path: Path, name: str, cfg, wanted) -> None:
    """Every array of `wanted` ((pure-dict keys, ShapeDtypeStruct) pairs) is in the tree at
    `path` with that shape, and the tree holds nothing else (its metadata only is read)."""
    with _lock:
        meta = _ckpt().metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    have = {
        tuple(_key_str(k) for k in keys): tuple(getattr(m, "shape", ()))
        for keys, m in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    want = {tuple(str(k) for k in keys): tuple(x.shape) for keys, x in wanted}
    if have != want:
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        what = "; ".join(
            s
            for s in (
                missing and f"missing {'/'.join(missing[0])}",
                extra and f"unexpected {'/'.join(extra[0])}",
                shapes
                and f"{'/'.join(shapes[0])} has shape {have[shapes[0]]}, not {want[shapes[0]]}",
            )
            if s
        )
        raise ValueError(
            f"checkpoint {path} does not hold parameters of module {name!r} as configured "
            f"({type(cfg).__name__}): {what}"
        )


def _key_str(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _restore_partial(path: Path, item: dict) -> dict:
    """The arrays of `item` (a nested dict of ShapeDtypeStructs, part of the saved tree) read
    from the tree at `path` as numpy arrays; the rest of the tree is not read."""
    import orbax.checkpoint as ocp

    global _partial
    with _lock:
        if _partial is None:
            _partial = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        args = ocp.args.PyTreeRestore(
            item=item,
            restore_args=jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), item),
            partial_restore=True,
        )
        return _partial.restore(path, args=args)


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
