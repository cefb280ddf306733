"""examples/multitask.yaml: text, vision and speech pathways share attention modules; training
the tasks in turn for a few steps lowers each task's loss, fused and through the pipeline engine.
Speech needs espeak-ng (its data set): without it, text and vision train and the test says so."""

from pathlib import Path

import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.data import TokenData
from pathways.datasets import speech
from pathways.datasets.digits import digits
from pathways.executor.local import LocalExecutor
from pathways.tokenizers import ByteTokenizer
from pathways.train import LocalTrainer, TrainConfig

SPEC = Path(__file__).resolve().parents[1] / "examples/multitask.yaml"
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


@pytest.mark.parametrize("engine", ["fused", "pipeline"])
def test_every_task_learns_through_the_shared_modules(tmp_path, engine, monkeypatch):
    spec = spec_lib.load(SPEC)
    assert spec.pathway("text").causal and not spec.pathway("digits").causal
    assert not spec.pathway("speech").causal
    shared = set(spec.pathway("text").modules) & set(spec.pathway("digits").modules)
    assert shared == {"shared-0", "shared-1"} == shared & set(spec.pathway("speech").modules)
    ex = LocalExecutor(spec)
    tok = ByteTokenizer()
    tasks = {
        "text": (TokenData.build([TEXT, TEXT[:400]], tok), 16, 32),
        "digits": (digits(), 32, spec.pathway("digits").max_seq_len),
    }
    if speech.espeak_available():
        monkeypatch.setenv("PATHWAYS_CACHE_DIR", str(tmp_path / "cache"))
        data = speech.speech.__wrapped__(
            train_per_word=2, test_per_word=1, unseen_per_word=1, vocabulary=27
        )
        data.check_pathway(spec, "speech")
        tasks["speech"] = (data, 8, spec.pathway("speech").max_seq_len)
    trainers = {
        name: LocalTrainer(
            ex,
            name,
            TrainConfig(steps=80, batch_size=b, seq_len=seq, lr=3e-3, warmup=1, eval_every=80),
            data,
            tmp_path / name,
            tok,
            engine=engine,
        )
        for name, (data, b, seq) in tasks.items()
    }
    before = {n: t.eval_loss() for n, t in trainers.items()}
    start = np.asarray(ex.state("shared-0").blocks[0].q.kernel[...]).copy()
    # Alternate the tasks: each step of one changes the shared modules the other reads.
    for step in range(1, 81):
        for t in trainers.values():
            t.run(should_stop=lambda t=t, s=step: t.step >= s)
    after = {n: t.eval_loss() for n, t in trainers.items()}
    for name in trainers:
        assert after[name] < before[name] - 0.2, (name, before[name], after[name])
    assert np.abs(np.asarray(ex.state("shared-0").blocks[0].q.kernel[...]) - start).max() > 1e-3
    if "speech" not in trainers:
        pytest.skip("text and vision trained; speech not: espeak-ng is not installed")
