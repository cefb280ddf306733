"""import-hf -> export-hf -> import-hf is lossless, through the CLI and real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from pathways import checkpoint as ckpt
from pathways import tokenizers
from pathways.executor.local import LocalExecutor
from pathways.hf import convert, files
from tools.cli.main import main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"


def _hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    t = files.Tensors(folder)
    return {n: np.asarray(t.get(n, t.get_shape(n))) for n in t.names()}


@pytest.mark.parametrize("name,split", [("gpt2", "2,1"), ("llama", "1,2"), ("llama-tied", None)])
def test_import_export_import_is_bit_identical(tmp_path, name, split):
    src = FIXTURES / name
    args = ["import-hf", str(src), "--out", str(tmp_path / "ckpt")]
    assert main(args + (["--split", split] if split else [])) == 0
    assert main(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0

    # The exported folder holds the very tensors transformers saved (float32 fixtures).
    original, exported = _hf_tensors(src), _hf_tensors(tmp_path / "hf")
    assert set(exported) == set(original)
    for n, arr in original.items():
        assert arr.tobytes() == exported[n].tobytes(), n
    cfg_in = json.loads((src / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: v for k, v in cfg_out.items() if k != "head_dim"} == {
        k: v for k, v in cfg_in.items() if k != "head_dim"
    }
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (
        src / "tokenizer.json"
    ).read_bytes()

    first = convert.load_hf(src, split)
    again = convert.load_hf(tmp_path / "hf", split)
    assert again.spec.to_dict() == first.spec.to_dict()
    for module in first.params:
        a, b = jax.tree.leaves(first.params[module]), jax.tree.leaves(again.params[module])
        assert len(a) == len(b)
        assert all(x.tobytes() == y.tobytes() and x.dtype == y.dtype for x, y in zip(a, b))


def test_imported_checkpoint_serves_reference_logits(tmp_path):
    """The written checkpoint (Orbax modules + spec + tokenizer) loads and keeps parity."""
    convert.import_hf(FIXTURES / "llama", tmp_path, "2,1")
    spec, tok = ckpt.load_spec(tmp_path)
    assert spec.tokenizer == {"kind": "bpe", "path": "tokenizer.json"}
    assert isinstance(tok, tokenizers.BpeTokenizer) and tok.vocab_size == 301
    ex = LocalExecutor(spec)
    for n, rt in ex.runtimes.items():
        ex.set_state(n, ckpt.load_module(tmp_path, n, rt.state))
    ref = np.load(FIXTURES / "llama" / "reference.npz")
    logits = ex.forward(spec.default_pathway, ref["prompts"])
    assert np.abs(logits - ref["prefill_logits"]).max() < 1e-4
