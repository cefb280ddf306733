"""Tests for the byte and BPE tokenizers and the streaming decoder."""

import pytest

from pathways import tokenizers
from pathways.tokenizers import EOS_TEXT, BpeTokenizer, ByteTokenizer, StreamDecoder

TEXT = "naïve café — 世界 𝄞 ok\n"  # 1-, 2-, 3- and 4-byte UTF-8 characters


def test_byte_round_trip_multibyte_utf8():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert len(ids) > len(TEXT)  # multi-byte characters are several ids
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == TEXT
    assert tok.decode([*ids[:3], tok.eos_id, *ids[3:]]) == TEXT  # end-of-text prints nothing
    assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_byte_decode_of_a_cut_character_is_a_replacement_not_an_error():
    tok = ByteTokenizer()
    assert tok.decode("€".encode()[:2]) == "\ufffd"


def test_stream_decoder_never_splits_characters():
    tok = ByteTokenizer()
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode(TEXT)]
    assert "".join(pieces) + dec.flush() == TEXT
    assert all("\ufffd" not in p for p in pieces)
    # Every piece is whole characters: each 4-byte character appears after its 4th byte only.
    clef = len("naïve café — 世界 ".encode())
    assert pieces[clef : clef + 3] == ["", "", ""] and pieces[clef + 3] == "𝄞"


def test_stream_decoder_flushes_an_incomplete_tail():
    dec = StreamDecoder(ByteTokenizer())
    assert dec.push(ord("a")) == "a"
    assert dec.push(0xE2) == ""
    assert dec.flush() == "\ufffd"


@pytest.fixture(scope="module")
def bpe():
    corpus = [
        "def add(a, b):\n    return a + b\n",
        "def sub(a, b):\n    return a - b\n",
        "naïve café 世界\n",
        "the quick brown fox jumps over the lazy dog\n",
    ] * 20
    return BpeTokenizer.train(corpus, vocab_size=300)


def test_bpe_train_save_load_round_trip(bpe, tmp_path):
    assert bpe.vocab_size <= 300
    assert bpe.eos_id >= 0
    text = "def add(a, b):\n    return a + b  # naïve 世界 𝄞"
    ids = bpe.encode(text)
    assert len(ids) < len(text.encode())  # merges learned from the corpus shorten it
    assert bpe.decode(ids) == text

    cfg = bpe.save(tmp_path)
    assert cfg == {"kind": "bpe", "path": "tokenizer.json"}
    loaded = tokenizers.load(cfg, tmp_path)
    assert loaded.encode(text) == ids
    assert loaded.decode(ids) == text
    assert (loaded.vocab_size, loaded.eos_id) == (bpe.vocab_size, bpe.eos_id)
    assert loaded.encode(EOS_TEXT) == [bpe.eos_id]


def test_bpe_stream_decoder_matches_full_decode(bpe):
    text = "return café 世界 𝄞!"
    dec = StreamDecoder(bpe)
    pieces = [dec.push(i) for i in bpe.encode(text)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text


def test_load_errors(tmp_path):
    assert isinstance(tokenizers.load({"kind": "byte"}), ByteTokenizer)
    with pytest.raises(ValueError, match="does not exist"):
        tokenizers.load({"kind": "bpe", "path": "tokenizer.json"}, tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load BPE tokenizer"):
        tokenizers.load({"kind": "bpe"}, tmp_path)
    with pytest.raises(ValueError, match="'wordpiece'"):
        tokenizers.load({"kind": "wordpiece"})
