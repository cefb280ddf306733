"""Modules sharded over a device mesh (tensor parallelism), with the model code unchanged.

A module's parameters and KV cache are placed on the devices of a one-axis mesh (`tp`) by its
kind's `partition` rules (`modules.kind`); the jitted steps are the same functions, and XLA's
SPMD partitioner splits them by the shardings of their arguments (attention heads and MLP columns
column-parallel, output projections row-parallel, embedding and LM head vocabulary-parallel).

A rule lists its choices in order of preference; the first whose sharded axis divides by the mesh
is used. Vocabularies such as 257 or 50257 do not divide: the embedding table and the LM head
then shard along d_model instead, which divides (no padding, so checkpoints and outputs keep
their shapes; the LM head's partial logits are summed across devices). What is replicated, and
why, is reported (`Placement.notes`).

    mesh = sharding.make_mesh(sharding.parse_mesh("tp=4"))
    ex = LocalExecutor(spec, mesh=mesh)          # or a module server's --mesh tp=4

On CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=8` gives 8 host devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "tp"


def parse_mesh(text: str) -> int:
    """The tensor-parallel size of a mesh setting "tp=N" (N >= 1)."""
    key, sep, value = str(text).partition("=")
    if key.strip() != AXIS or not sep or not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"mesh must look like tp=N with N >= 1 (e.g. tp=4); got {text!r}")
    return int(value)


def make_mesh(tp: int, devices: list | None = None) -> Mesh:
    """A one-axis mesh over the first `tp` devices."""
    devices = jax.devices() if devices is None else devices
    if tp > len(devices):
        raise ValueError(
            f"mesh tp={tp} needs {tp} devices; {len(devices)} {devices[0].platform} device(s) "
            "here (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    return Mesh(np.array(devices[:tp]), (AXIS,))


@dataclasses.dataclass
class Placement:
    """Where a module's arrays went: their shardings and what was not split, and why."""

    shardings: Any  # a pytree of NamedSharding, like the state
    notes: list[str]


def _path(keys) -> tuple[str, ...]:
    out = []
    for k in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(p for p in out if p != "value")


def _choose(choices, shape, size: int) -> tuple | None:
    """The first choice whose sharded axes divide by the mesh size (None: replicate)."""
    for spec in choices or ():
        if len(spec) != len(shape):
            continue
        if all(a is None or shape[i] % size == 0 for i, a in enumerate(spec)):
            return spec
    return None


def plan(rule, cfg, tree, mesh: Mesh, what: str = "") -> Placement:
    """Shardings for the arrays of `tree` by `rule(cfg, path, shape) -> [spec, ...]` (or None:
    replicate everything)."""
    size = mesh.shape[AXIS]
    notes = []

    def one(keys, x):
        shape = tuple(getattr(x, "shape", ()))
        path = _path(keys)
        choices = rule(cfg, path, shape) if rule is not None else None
        spec = _choose(choices, shape, size)
        if spec is None and choices and size > 1:
            notes.append(
                f"{what}{'/'.join(path)} {list(shape)}: replicated (no axis of its rule divides "
                f"by tp={size})"
            )
        return NamedSharding(mesh, PartitionSpec(*(spec or ())))

    return Placement(jax.tree_util.tree_map_with_path(one, tree), notes)


def place(tree, placement: Placement):
    return jax.tree.map(jax.device_put, tree, placement.shardings)


def bytes_per_device(tree) -> dict[int, int]:
    """Bytes of `tree`'s arrays held by each device (shards counted where they live)."""
    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            out[shard.device.id] = out.get(shard.device.id, 0) + int(shard.data.nbytes)
    return out
