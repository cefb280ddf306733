"""Test helpers: a randomly initialised checkpoint of a spec (no training needed)."""

from __future__ import annotations

from pathlib import Path

from pathways import checkpoint as ckpt
from pathways import spec as spec_lib
from pathways import tokenizers

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def make_checkpoint(
    directory: str | Path,
    spec_path: str | Path | spec_lib.PathwaySpec = EXAMPLES / "tiny.yaml",
    seed: int = 0,
):
    """Saves every module of the spec (a file, or a loaded spec) with seeded random weights;
    returns the LocalExecutor.

    The checkpoint always gets the byte tokenizer (token-level tests and benchmarks need no other).
    """
    from pathways.executor.local import LocalExecutor

    spec = spec_path if isinstance(spec_path, spec_lib.PathwaySpec) else spec_lib.load(spec_path)
    ex = LocalExecutor(spec, seed=seed)
    ckpt.save_spec(directory, spec, tokenizers.ByteTokenizer())
    for name in spec.modules:
        ckpt.save_module(directory, name, ex.state(name))
    return ex
