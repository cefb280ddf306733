"""examples/multitask.yaml: text, vision and speech pathways share attention modules; training
the tasks in turn for a few steps lowers each task's loss, fused and through the pipeline engine.
Speech needs espeak-ng (its data set): without it, text and vision train and the test says so."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.data import TokenData
from pathways.datasets import speech
from pathways.datasets.digits import digits
from pathways.executor.local import LocalExecutor
from pathways.multitask import MultiTaskTrainer, Task, local_stages
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


def _rounds(spec, tasks, base, out, optimizers, stop=None, resume=False):
    """Task losses per round of a MultiTaskTrainer over fresh in-process stages."""
    ex = LocalExecutor(spec)
    mt = MultiTaskTrainer(
        spec,
        tasks,
        local_stages(ex, spec, tasks, base, optimizers),
        base,
        out,
        ByteTokenizer(),
        optimizers=optimizers,
    )
    if resume:
        assert mt.try_resume()
    hist = mt.run(should_stop=None if stop is None else lambda: mt.step >= stop)
    return [[r["task_losses"][t.pathway] for t in tasks] for r in hist]


def test_per_task_optimizers_train_as_each_task_by_itself_in_turn(tmp_path):
    """A multi-task run's default, per-task optimizer states: each task's updates of a shared
    module step that task's own AdamW state and schedule, so rounds of the job's trainer equal
    each task's own LocalTrainer taking one step in turn (the sharing benchmark's setting, lr
    factors included), and resume from a checkpoint exactly; one shared state does not."""
    spec = spec_lib.load(SPEC)
    tok = ByteTokenizer()
    rounds = 4
    base = TrainConfig(steps=rounds, lr=3e-3, warmup=1, eval_every=rounds, save_every=2)
    tasks = [
        Task("text", TokenData.build([TEXT, TEXT[:400]], tok), 8, 32),
        Task("digits", digits(), 8, 16, lr_scale={"shared-0": 0.3, "shared-1": 0.3}),
    ]
    per_task = _rounds(spec, tasks, base, tmp_path / "per-task", "per-task")
    shared = _rounds(spec, tasks, base, tmp_path / "shared", "shared")
    ex = LocalExecutor(spec)
    trainers = [
        LocalTrainer(
            ex,
            t.pathway,
            dataclasses.replace(base, batch_size=t.batch_size, seq_len=t.seq_len),
            t.data,
            tmp_path / "alone" / t.pathway,
            tok,
            lr_scale=t.lr_scale or None,
        )
        for t in tasks
    ]
    alone = [
        [tr.run(should_stop=lambda tr=tr, s=step: tr.step >= s)[-1]["loss"] for tr in trainers]
        for step in range(1, rounds + 1)
    ]
    np.testing.assert_allclose(per_task, alone, rtol=1e-4)
    assert np.abs(np.asarray(shared[-1]) / np.asarray(alone[-1]) - 1).max() > 1e-3
    # Interrupted after 2 rounds (its checkpoint: train/<module>@<task> per state), resumed.
    _rounds(spec, tasks, base, tmp_path / "resumed", "per-task", stop=2)
    assert (tmp_path / "resumed/train/shared-0@digits").is_dir()
    rest = _rounds(spec, tasks, base, tmp_path / "resumed", "per-task", resume=True)
    np.testing.assert_allclose(rest, per_task[2:], rtol=1e-6)
