"""End to end, locally: train the tiny example on a slice of the default corpus, then generate."""

import json
from pathlib import Path

import pytest

from pathways import data
from pathways.tokenizers import ByteTokenizer
from tools.cli.main import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA_MB = 1.5
STEPS = 250


@pytest.mark.slow
def test_train_tiny_beats_unigram_then_generate(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--spec",
            str(EXAMPLES / "tiny.yaml"),
            "--pathway",
            "tiny",
            "--max-data-mb",
            str(DATA_MB),
            "--steps",
            str(STEPS),
            "--batch-size",
            "16",
            "--seq-len",
            "128",
            "--eval-every",
            "50",
            "--save-every",
            str(STEPS),
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err

    # The same slice and split the command trained on; eval is held-out documents.
    texts = data.read_texts(data.default_corpus_paths(), int(DATA_MB * 1e6))
    unigram = data.TokenData.build(texts, ByteTokenizer()).unigram_loss()
    assert 2.7 < unigram < 3.6  # bytes of Python source: about 3.1 nats

    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == STEPS // 50
    # A trained tiny model reaches about 2.0 nats; "well below" leaves room for noise only.
    assert evals[-1] < unigram - 0.6, (evals, unigram)
    assert evals[-1] < evals[0]
    capsys.readouterr()

    code = main(
        [
            "generate",
            "--checkpoint",
            str(out),
            "--prompt",
            "def ",
            "--max-tokens",
            "80",
            "--temperature",
            "0",
        ]
    )
    text, err = capsys.readouterr()
    assert code == 0, err
    assert text.startswith("def ") and text.endswith("\n")
    generated = text[len("def ") : -1]
    assert len(generated) >= 40  # 80 byte tokens, unless it ended at end-of-text
    # Trained on Python sources, it writes printable ASCII (a random model would not).
    printable = sum(c.isprintable() or c in "\n\t" for c in generated) / len(generated)
    assert printable > 0.95 and generated.isascii(), repr(generated)
