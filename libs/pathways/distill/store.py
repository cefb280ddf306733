"""A teacher's activations at every module boundary, in sharded memory-mapped .npy files.

Layout of a store directory:
    index.json                  boundaries, shapes, dtypes, shard row counts, teacher provenance
    shard-00000/tokens.npy      (rows, T) int32 inputs
    shard-00000/targets.npy     (rows, T) int32 next tokens
    shard-00000/b1.npy          (rows, T, D) output of the pathway's 1st module (the embedding)
    ...
    shard-00000/b<k-1>.npy      (rows, T, D) output of the last attention module
    shard-00000/logits.npy      (rows, T, V) float32 teacher logits, only if V <= LOGITS_MAX_VOCAB

Boundary i is the input of the pathway's i-th module (b0 = "tokens") and the output of module
i - 1; the decoding module's output is "logits". Readers open shards with mmap, so a training
task touches only the rows of its batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from pathways.data import TokenData
from pathways.executor.local import LocalExecutor

# Logits are (rows, T, V) float32: 2,048 x 4 bytes = 8 KiB per token, 32 times a d_model-64 hidden
# state. Above this vocabulary the decoding student recomputes the teacher's logits from the
# last hidden boundary with the teacher's own decoding module instead (see distill.students).
LOGITS_MAX_VOCAB = 2048
INDEX = "index.json"


def boundary_names(n_modules: int) -> list[str]:
    """Names of the n_modules + 1 boundaries of a pathway: tokens, b1 .. b<n-1>, logits."""
    return ["tokens"] + [f"b{i}" for i in range(1, n_modules)] + ["logits"]


def record(
    executor: LocalExecutor,
    pathway: str,
    data: TokenData,
    out: str | Path,
    *,
    rows: int,
    seq_len: int,
    batch_size: int = 16,
    shard_rows: int = 256,
    seed: int = 0,
    hidden_dtype: str = "float32",
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Runs the teacher over `rows` training windows and writes every boundary into `out`.

    Windows are `data.batch(step, batch_size, seq_len, seed)` for step = 0, 1, ... (the same
    deterministic sampling as training). The index is written last, so a store with an index is
    complete.

    Returns:
        The store directory.
    """
    out = Path(out)
    if (out / INDEX).exists():
        raise FileExistsError(f"{out} already holds an activation store")
    if rows % batch_size or shard_rows % batch_size:
        raise ValueError(
            f"rows ({rows}) and shard_rows ({shard_rows}) must be multiples of "
            f"batch_size ({batch_size})"
        )
    chain = executor.chain(pathway)
    names = boundary_names(len(chain))
    d_model = chain[0].cfg.output_contract[1]
    vocab = chain[-1].cfg.output_contract[1]
    keep_logits = vocab <= LOGITS_MAX_VOCAB
    shapes = {"tokens": ((seq_len,), "int32"), "targets": ((seq_len,), "int32")}
    for n in names[1:-1]:
        shapes[n] = ((seq_len, d_model), hidden_dtype)
    if keep_logits:
        shapes["logits"] = ((seq_len, vocab), "float32")

    out.mkdir(parents=True, exist_ok=True)
    shards, arrays, written = [], {}, 0
    positions = jnp.broadcast_to(jnp.arange(seq_len), (batch_size, seq_len))
    for step in range(rows // batch_size):
        if written % shard_rows == 0:
            n_rows = min(shard_rows, rows - written)
            shard = out / f"shard-{len(shards):05d}"
            shard.mkdir(exist_ok=True)
            arrays = {
                k: np.lib.format.open_memmap(
                    shard / f"{k}.npy", mode="w+", dtype=dt, shape=(n_rows, *tail)
                )
                for k, (tail, dt) in shapes.items()
            }
            shards.append({"dir": shard.name, "rows": n_rows})
        inputs, targets = data.batch(step, batch_size, seq_len, seed)
        r = slice(written % shard_rows, written % shard_rows + batch_size)
        arrays["tokens"][r], arrays["targets"][r] = inputs, targets
        x = jnp.asarray(inputs)
        for name, rt in zip(names[1:], chain):
            x = rt.forward(rt.state, x, positions)
            if name in arrays:
                arrays[name][r] = np.asarray(x)
        written += batch_size
        if written % shard_rows == 0 or written == rows:
            for a in arrays.values():
                a.flush()
    index = {
        "pathway": pathway,
        "modules": [rt.name for rt in chain],
        "boundaries": names,
        "rows": rows,
        "seq_len": seq_len,
        "d_model": d_model,
        "vocab_size": vocab,
        "logits": keep_logits,
        "logits_max_vocab": LOGITS_MAX_VOCAB,
        "seed": seed,
        "batch_size": batch_size,
        "shard_rows": shard_rows,
        "arrays": {k: {"shape": list(t), "dtype": dt} for k, (t, dt) in shapes.items()},
        "shards": shards,
        "provenance": provenance or {},
    }
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(out / INDEX)
    return out


class ActivationStore:
    """Read side: random batches of rows from any arrays, through per-shard memory maps."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / INDEX).exists():
            raise FileNotFoundError(f"{self.path} is not a complete activation store (no {INDEX})")
        self.index = json.loads((self.path / INDEX).read_text())
        self.rows: int = self.index["rows"]
        self._starts = np.cumsum([0] + [s["rows"] for s in self.index["shards"]])
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    @property
    def modules(self) -> list[str]:
        return self.index["modules"]

    @property
    def has_logits(self) -> bool:
        return bool(self.index["logits"])

    def _meta(self, name: str) -> dict:
        if name not in self.index["arrays"]:
            raise KeyError(
                f"store {self.path} has no array {name!r}; it has "
                f"{', '.join(self.index['arrays'])}"
            )
        return self.index["arrays"][name]

    def array(self, shard: int, name: str) -> np.ndarray:
        self._meta(name)
        key = (shard, name)
        if key not in self._maps:
            d = self.path / self.index["shards"][shard]["dir"]
            self._maps[key] = np.load(d / f"{name}.npy", mmap_mode="r")
        return self._maps[key]

    def rows_of(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows (global indices, any order) of array `name`, gathered across shards."""
        rows = np.asarray(rows)
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        meta = self._meta(name)
        out = np.empty((len(rows), *meta["shape"]), meta["dtype"])
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = self.array(int(s), name)[rows[sel] - self._starts[s]]
        return out

    def batches(self, names: list[str], batch_size: int, steps: int, seed: int = 0):
        """`steps` batches of random rows (sampled with replacement across epochs)."""
        rng = np.random.default_rng(seed)
        order = np.array([], np.int64)
        for _ in range(steps):
            if len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(self.rows)])
            rows, order = order[:batch_size], order[batch_size:]
            rows = np.sort(rows)  # sequential reads within a shard
            yield {n: self.rows_of(n, rows) for n in names}
