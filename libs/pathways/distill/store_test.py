"""Activation store: every boundary equals the teacher's forward; shards; batches; logit limit."""

import json

import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.data import TokenData
from pathways.distill import store as store_lib
from pathways.distill.store import ActivationStore, record
from pathways.executor.local import LocalExecutor


def _spec(vocab=37):
    return spec_lib.from_dict(
        {
            "modules": {
                "embed": {
                    "kind": "embedding",
                    "vocab_size": vocab,
                    "d_model": 12,
                    "max_seq_len": 16,
                },
                "a0": {
                    "kind": "attention",
                    "d_model": 12,
                    "n_layers": 1,
                    "n_heads": 3,
                    "max_seq_len": 16,
                },
                "head": {"kind": "decoding", "d_model": 12, "vocab_size": vocab},
            },
            "pathways": {"p": ["embed", "a0", "head"]},
        }
    )


DATA = TokenData(
    train=np.random.default_rng(0).integers(0, 37, 3000).astype(np.int32),
    eval=np.arange(300, dtype=np.int32) % 37,
)


def test_boundaries_match_the_teacher_and_shards_split_rows(tmp_path):
    ex = LocalExecutor(_spec(), seed=2)
    record(ex, "p", DATA, tmp_path / "s", rows=20, seq_len=7, batch_size=4, shard_rows=8)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["boundaries"] == ["tokens", "b1", "b2", "logits"]
    assert [s["rows"] for s in index["shards"]] == [8, 8, 4] and index["logits"]
    st = ActivationStore(tmp_path / "s")
    rows = np.array([19, 0, 9, 8, 3])
    toks = st.rows_of("tokens", rows)
    inputs = np.concatenate([DATA.batch(i, 4, 7, 0)[0] for i in range(5)])
    np.testing.assert_array_equal(toks, inputs[rows])
    np.testing.assert_array_equal(
        st.rows_of("targets", rows),
        np.concatenate([DATA.batch(i, 4, 7, 0)[1] for i in range(5)])[rows],
    )
    # b1 is the embedding's output, b2 the attention module's; logits the whole pathway's.
    emb = ex.runtimes["embed"]
    pos = np.broadcast_to(np.arange(7), toks.shape)
    np.testing.assert_allclose(st.rows_of("b1", rows), emb.forward(emb.state, toks, pos), atol=1e-6)
    np.testing.assert_allclose(st.rows_of("logits", rows), ex.forward("p", toks), atol=1e-5)
    assert isinstance(st.array(0, "b2"), np.memmap)
    seen = np.concatenate([b["tokens"] for b in st.batches(["tokens"], 5, 4, seed=1)])
    assert len(np.unique(seen, axis=0)) == 20  # one epoch of batches covers every row once


def test_large_vocab_skips_logits_and_bad_requests_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(store_lib, "LOGITS_MAX_VOCAB", 16)
    record(LocalExecutor(_spec()), "p", DATA, tmp_path / "s", rows=4, seq_len=5, batch_size=4)
    st = ActivationStore(tmp_path / "s")
    assert not st.has_logits and "logits" not in st.index["arrays"]
    with pytest.raises(KeyError, match="has no array 'logits'"):
        st.rows_of("logits", np.array([0]))
    with pytest.raises(FileExistsError, match="already holds an activation store"):
        record(LocalExecutor(_spec()), "p", DATA, tmp_path / "s", rows=4, seq_len=5, batch_size=4)
    with pytest.raises(ValueError, match=r"rows \(6\) and shard_rows \(256\) must be multiples"):
        record(LocalExecutor(_spec()), "p", DATA, tmp_path / "t", rows=6, seq_len=5, batch_size=4)
    with pytest.raises(FileNotFoundError, match="not a complete activation store"):
        ActivationStore(tmp_path / "t")
