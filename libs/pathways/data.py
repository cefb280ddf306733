"""Training data: a corpus of text files as one token array, split into train and eval."""

from __future__ import annotations

import dataclasses
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pathways.tokenizers import Tokenizer

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


def default_corpus_paths() -> list[Path]:
    """The running interpreter's own standard library sources: real text, no download."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def iter_files(paths: list[str | Path]) -> Iterator[Path]:
    """Files named directly, and text files found under named folders, in a stable order."""
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.suffix in TEXT_SUFFIXES and f.is_file() and "site-packages" not in f.parts:
                    yield f
        elif p.is_file():
            yield p
        else:
            raise FileNotFoundError(f"data path {p} does not exist")


def read_texts(paths: list[str | Path], max_bytes: int) -> list[str]:
    texts, total = [], 0
    for f in iter_files(paths):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable files are not training text
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    if not texts:
        raise ValueError(f"no readable text files under {', '.join(map(str, paths))}")
    return texts


@dataclasses.dataclass
class TokenData:
    """Train/eval token streams; batches are a pure function of (seed, step), so runs resume exactly."""

    train: np.ndarray  # (N,) int32
    eval: np.ndarray  # (M,) int32

    @staticmethod
    def build(texts: list[str], tokenizer: Tokenizer, eval_fraction: float = 0.05) -> TokenData:
        # Whole documents go to eval (the last ones), so eval text is never seen in training.
        n_eval = max(1, round(len(texts) * eval_fraction)) if len(texts) > 1 else 0
        train_texts, eval_texts = texts[: len(texts) - n_eval], texts[len(texts) - n_eval :]

        def encode(docs: list[str]) -> np.ndarray:
            ids: list[int] = []
            for d in docs:
                ids.extend(tokenizer.encode(d))
                if tokenizer.eos_id >= 0:
                    ids.append(tokenizer.eos_id)
            return np.asarray(ids, np.int32)

        train = encode(train_texts)
        evals = encode(eval_texts) if eval_texts else train[-len(train) // 20 :]
        if n_eval == 0:
            train = train[: -len(evals)]
        return TokenData(train=train, eval=evals)

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, split: str = "train"):
        """Returns (inputs, targets), each (batch_size, seq_len) int32."""
        tokens = self.train if split == "train" else self.eval
        if len(tokens) < seq_len + 2:
            raise ValueError(
                f"{split} split has {len(tokens)} tokens, fewer than seq_len "
                f"{seq_len} + 2: give more data or a shorter seq_len"
            )
        rng = np.random.default_rng([seed, step, 0 if split == "train" else 1])
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
        windows = np.stack([tokens[s : s + seq_len + 1] for s in starts])
        return windows[:, :-1], windows[:, 1:]

    def unigram_loss(self) -> float:
        """Cross-entropy of the eval split under the train split's unigram distribution (nats)."""
        vocab = int(max(self.train.max(), self.eval.max())) + 1
        counts = np.bincount(self.train, minlength=vocab).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        return float(-logp[self.eval].mean())
