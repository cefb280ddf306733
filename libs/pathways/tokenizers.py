"""Tokenizers: byte-level (the default, nothing to train) and BPE via the `tokenizers` library."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

EOS_TEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: Path) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; id 256 is end-of-text."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> dict:
        return {"kind": "byte"}


class BpeTokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) backed by a `tokenizer.json`."""

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        eos = tok.token_to_id(EOS_TEXT)
        self.eos_id = eos if eos is not None else -1

    @staticmethod
    def train(texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HfTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return BpeTokenizer(tok)

    @staticmethod
    def load(path: str | Path) -> BpeTokenizer:
        from tokenizers import Tokenizer as HfTokenizer

        path = Path(path)
        try:
            return BpeTokenizer(HfTokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises plain Exception on bad files
            raise ValueError(f"cannot load BPE tokenizer {path}: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    def save(self, directory: Path) -> dict:
        self._tok.save(str(Path(directory) / "tokenizer.json"))
        return {"kind": "bpe", "path": "tokenizer.json"}


def load(config: dict, directory: str | Path | None = None) -> Tokenizer:
    """Loads the tokenizer a spec/checkpoint describes; BPE paths are relative to `directory`."""
    kind = config.get("kind", "byte")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        path = Path(config.get("path", "tokenizer.json"))
        if not path.is_absolute() and directory is not None:
            path = Path(directory) / path
        if not path.exists():
            raise ValueError(f"BPE tokenizer file {path} does not exist")
        return BpeTokenizer.load(path)
    raise ValueError(f"tokenizer.kind must be 'byte' or 'bpe', got {kind!r}")


class StreamDecoder:
    """Turns a growing list of ids into text pieces without splitting multi-byte characters."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece = text[self._emitted :]
        self._emitted = len(text)
        return piece

    def flush(self) -> str:
        text = self._tok.decode(self._ids)
        piece = text[self._emitted :]
        self._emitted = len(text)
        return piece
