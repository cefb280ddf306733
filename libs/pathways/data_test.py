"""Tests for the training data: corpus reading, the train/eval split, batches, unigram baseline."""

import math

import numpy as np
import pytest

from pathways import data
from pathways.tokenizers import ByteTokenizer


def test_default_corpus_is_the_standard_library():
    [root] = data.default_corpus_paths()
    assert (root / "os.py").is_file()


def test_read_texts_walks_folders_in_order_and_stops_near_the_budget(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.py").write_text("x" * 50)
    (tmp_path / "a.txt").write_text("y" * 50)
    (tmp_path / "skip.bin").write_bytes(b"\xff\xfe")
    (tmp_path / "c.md").write_text("z" * 50)
    assert data.read_texts([tmp_path], max_bytes=10_000) == ["y" * 50, "x" * 50, "z" * 50]
    assert data.read_texts([tmp_path], max_bytes=60) == ["y" * 50, "x" * 50]
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        data.read_texts([tmp_path / "does-not-exist"], 100)


def test_split_keeps_eval_documents_out_of_training():
    texts = [chr(ord("a") + i) * 30 for i in range(20)]
    td = data.TokenData.build(texts, ByteTokenizer(), eval_fraction=0.1)
    eos = ByteTokenizer.eos_id
    assert td.eval.tolist() == ([ord("s")] * 30 + [eos] + [ord("t")] * 30 + [eos])
    assert ord("s") not in td.train and len(td.train) == 18 * 31


def test_batches_are_a_pure_function_of_seed_and_step():
    td = data.TokenData(train=np.arange(1000, dtype=np.int32), eval=np.arange(50, dtype=np.int32))
    x, y = td.batch(step=3, batch_size=4, seq_len=9, seed=1)
    assert x.shape == y.shape == (4, 9)
    np.testing.assert_array_equal(y, x + 1)  # targets are the next tokens
    x2, _ = td.batch(step=3, batch_size=4, seq_len=9, seed=1)
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(x, td.batch(step=4, batch_size=4, seq_len=9, seed=1)[0])
    with pytest.raises(ValueError, match="eval split has 50 tokens, fewer than seq_len 60"):
        td.batch(0, 1, 60, 0, split="eval")


def test_unigram_loss():
    # Uniform over 4 symbols in train (with add-one smoothing still uniform): ln 4 nats.
    td = data.TokenData(
        train=np.tile(np.arange(4, dtype=np.int32), 100), eval=np.arange(4, dtype=np.int32)
    )
    assert td.unigram_loss() == pytest.approx(math.log(4), rel=1e-6)
