"""Modules that train apart, grow and shrink, on a briefly trained 4-module byte-level teacher.

Blockwise distillation runs through a real broker and a real worker (4 + 1 pool processes), with
every module task on its own queue; surgery runs in-process.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pathways import data as data_lib
from pathways import spec as spec_lib
from pathways import surgery
from pathways.coordinator import worker as worker_proc
from pathways.coordinator.app import DEFAULT_QUEUE, make_app
from pathways.coordinator.broker import EmbeddedBroker
from pathways.coordinator.distill_client import distill, module_queues
from pathways.distill.request import DistillRequest
from pathways.evaluation import eval_loss
from pathways.executor.local import LocalExecutor
from pathways.tokenizers import ByteTokenizer
from pathways.train import LocalTrainer, TrainConfig

pytestmark = pytest.mark.slow

D, SEQ, DATA_MB = 32, 32, 0.3
# The assembled student may trail its teacher by at most this much eval loss (nats/token). Measured
# gap with these settings: about 0.015 (100 steps per module).
MARGIN = 0.1
EVAL = dict(batch_size=16, seq_len=SEQ, batches=4, seed=0)


def spec_dict(d_ff: int | None = None) -> dict:
    attn = {"kind": "attention", "d_model": D, "n_layers": 1, "n_heads": 2, "max_seq_len": 64}
    if d_ff:
        attn["d_ff"] = d_ff
    return {
        "modules": {
            "embed": {"kind": "embedding", "vocab_size": 257, "d_model": D, "max_seq_len": 64},
            "attn-0": attn,
            "attn-1": dict(attn),
            "head": {"kind": "decoding", "d_model": D, "vocab_size": 257},
        },
        "pathways": {"p": ["embed", "attn-0", "attn-1", "head"]},
    }


@pytest.fixture(scope="module")
def corpus():
    texts = data_lib.read_texts(data_lib.default_corpus_paths(), int(DATA_MB * 1e6))
    return data_lib.TokenData.build(texts, ByteTokenizer())


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, corpus):
    """(checkpoint dir, executor): 150 steps of end-to-end training, eval loss about 2.7 nats."""
    out = tmp_path_factory.mktemp("teacher")
    ex = LocalExecutor(spec_lib.from_dict(spec_dict()))
    cfg = TrainConfig(
        steps=150,
        batch_size=16,
        seq_len=SEQ,
        lr=1e-2,
        warmup=10,
        eval_every=150,
        eval_batches=2,
        save_every=150,
    )
    LocalTrainer(ex, "p", cfg, corpus, out, ByteTokenizer()).run()
    return out, ex


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """An embedded broker and one worker consuming the default and every module queue."""
    queues = ",".join([DEFAULT_QUEUE] + [f"pathways.module.{m}" for m in spec_dict()["modules"]])
    with EmbeddedBroker(workdir=tmp_path_factory.mktemp("broker")) as broker:
        proc = worker_proc.spawn(broker.url, concurrency=5, queues=queues)
        try:
            yield make_app(broker.url)
        finally:
            worker_proc.stop(proc)


def test_parallel_blockwise_distillation_matches_the_teacher(teacher, worker, tmp_path):
    teacher_dir, _ = teacher
    req = DistillRequest(
        teacher=str(teacher_dir),
        student_spec=spec_dict(d_ff=2 * D),
        out=str(tmp_path / "student"),
        store=str(tmp_path / "store"),
        max_data_mb=DATA_MB,
        rows=256,
        seq_len=SEQ,
        shard_rows=128,
        steps=100,
        batch_size=16,
        lr=1e-2,
        warmup=10,
        eval_batches=4,
        baseline_steps=100,
    )
    assert module_queues(req) == [
        "pathways.module.embed",
        "pathways.module.attn-0",
        "pathways.module.attn-1",
        "pathways.module.head",
    ]
    result = distill(worker, req, timeout=600)

    mods = [t for t in result["tasks"] if "position" in t]
    assert [m["student"] for m in mods] == ["embed", "attn-0", "attn-1", "head"]
    assert all(m["queue"] == f"pathways.module.{m['student']}" for m in mods)
    # Every module task was running at one moment: the latest start precedes the earliest end.
    assert max(m["started"] for m in mods) < min(m["ended"] for m in mods), mods
    assert len({m["pid"] for m in mods}) == 4
    student, teacher_loss = result["student"]["eval_loss"], result["teacher"]["eval_loss"]
    assert student <= teacher_loss + MARGIN, result
    assert result["params"]["student"] < result["params"]["teacher"]  # narrower MLPs
    assert np.isfinite(result["baseline"]["eval_loss"])
    # The assembled checkpoint is a normal one: spec, tokenizer and every module.
    assert (tmp_path / "student" / "spec.yaml").exists()
    assert {p.name for p in (tmp_path / "student" / "modules").iterdir()} == {
        "embed",
        "attn-0",
        "attn-1",
        "head",
    }


def test_inserted_module_preserves_logits_then_training_it_alone_improves(
    teacher, corpus, tmp_path
):
    _, ex = teacher
    tokens = corpus.batch(0, 4, SEQ, 0, split="eval")[0]
    spec2, state = surgery.insert_attention(ex.spec, "p", "attn-new", 2, seed=7)
    assert spec2.pathway("p").modules == ("embed", "attn-0", "attn-new", "attn-1", "head")
    grown = LocalExecutor(
        spec2,
        states={
            **{n: jax.tree.map(np.array, ex.state(n)) for n in ex.spec.modules},
            "attn-new": state,
        },
    )
    assert np.abs(grown.forward("p", tokens) - ex.forward("p", tokens)).max() <= 1e-6
    before = eval_loss(grown, "p", corpus, **EVAL)
    frozen = {n: jax.tree.map(np.array, grown.state(n)) for n in ex.spec.modules}

    cfg = TrainConfig(
        steps=100,
        batch_size=16,
        seq_len=SEQ,
        lr=2e-2,
        warmup=5,
        eval_every=100,
        eval_batches=2,
        save_every=100,
        seed=1,
    )
    LocalTrainer(
        grown,
        "p",
        cfg,
        corpus,
        tmp_path / "grown",
        ByteTokenizer(),
        engine="pipeline",
        n_micro=2,
        trainable={"attn-new"},
    ).run()
    after = eval_loss(grown, "p", corpus, **EVAL)
    print(f"inserting attn-new: eval loss {before:.4f} -> {after:.4f} after training it alone")
    assert after < before - 0.005, (before, after)  # same eval batches: no sampling noise
    for n, st in frozen.items():  # the other modules did not move
        for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(grown.state(n))):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_removing_a_module_reports_the_change_in_eval_loss(teacher, corpus):
    _, ex = teacher
    effect = surgery.removal_effect(ex, "p", "attn-1", corpus, **EVAL)
    print(
        f"removing attn-1: eval loss {effect['before']:.4f} -> {effect['after']:.4f} "
        f"({effect['delta']:+.4f} nats)"
    )
    assert effect["spec"].pathway("p").modules == ("embed", "attn-0", "head")
    assert effect["before"] == pytest.approx(eval_loss(ex, "p", corpus, **EVAL))
    assert effect["delta"] > 0  # a trained module carried part of the function
