"""A vision pathway trains through the same Trainer and engines as text (targets are labels,
the attention is bidirectional), and `Classifier` reads its class probabilities."""

import jax
import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.classify import Classifier
from pathways.datasets.digits import digits
from pathways.executor.local import LocalExecutor
from pathways.tokenizers import ByteTokenizer
from pathways.train import LocalTrainer, TrainConfig

# Tiny and odd: 4x4 patches of the 8x8 digits (4 positions), width 12, 3 heads.
SPEC = spec_lib.from_dict(
    {
        "modules": {
            "patches": {
                "kind": "image_embedding",
                "image_size": 8,
                "channels": 1,
                "patch_size": 4,
                "d_model": 12,
            },
            "attn": {
                "kind": "attention",
                "d_model": 12,
                "n_layers": 1,
                "n_heads": 3,
                "max_seq_len": 8,
            },
            "classes": {"kind": "classification", "d_model": 12, "n_classes": 10},
            "embed": {"kind": "embedding", "vocab_size": 11, "d_model": 12, "max_seq_len": 8},
            "head": {"kind": "decoding", "d_model": 12, "vocab_size": 11},
        },
        "pathways": {"digits": ["patches", "attn", "classes"], "text": ["embed", "attn", "head"]},
    }
)
CFG = TrainConfig(
    steps=30, batch_size=32, seq_len=4, lr=2e-2, warmup=2, eval_every=30, save_every=30
)


def _train(tmp_path, engine):
    ex = LocalExecutor(SPEC, seed=3)
    trainer = LocalTrainer(
        ex, "digits", CFG, digits(), tmp_path / engine, ByteTokenizer(), engine=engine
    )
    return ex, trainer.run()


def _rel_err(a, b):
    """Max abs difference over a module's tree, relative to the tree's largest magnitude."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(la, lb))
    return diff / max(float(np.abs(np.asarray(y)).max()) for y in lb)


def test_a_few_steps_lower_the_loss_fused_and_pipelined_alike(tmp_path):
    fused_ex, fused = _train(tmp_path, "fused")
    pipe_ex, piped = _train(tmp_path, "pipeline")
    first, last = fused[0]["loss"], np.mean([r["loss"] for r in fused[-3:]])
    assert first == pytest.approx(np.log(10), rel=0.1)  # ten classes, untrained
    assert last < first - 0.3
    np.testing.assert_allclose([r["loss"] for r in piped], [r["loss"] for r in fused], rtol=1e-4)
    # 30 Adam steps amplify float noise where a gradient is ~0 (the key bias cancels in the
    # softmax), so parameters agree to 1e-3 of their scale, losses to 1e-4.
    for name in SPEC.pathway("digits").modules:
        assert _rel_err(pipe_ex.state(name), fused_ex.state(name)) <= 1e-3, name
    # The executor's loss reads the pathway's mask too: the eval loss the trainer recorded.
    evals = [digits().batch(i, 32, 4, CFG.seed, split="eval") for i in range(CFG.eval_batches)]
    loss = np.mean([fused_ex.loss("digits", x, y) for x, y in evals])
    assert loss == pytest.approx(fused[-1]["eval_loss"], rel=1e-5)


def test_classifier_probabilities_follow_the_pathway(tmp_path):
    ex, _ = _train(tmp_path, "fused")
    clf = Classifier(ex, "digits", batch_size=64)
    d = digits()
    p = clf.probabilities(d.test_images[:100])  # one full batch and one padded
    assert p.shape == (100, 10)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(p[64:], clf.probabilities(d.test_images[64:100]), rtol=1e-5)
    # The same numbers as the loss: mean -log p(label) is the executor's cross-entropy.
    ce = -np.log(p[np.arange(64), d.test_labels[:64]]).mean()
    assert ce == pytest.approx(ex.loss("digits", d.test_images[:64], d.test_labels[:64]), rel=1e-4)
    assert clf.accuracy(d.test_images, d.test_labels) > 0.3  # 30 steps: well above chance


def test_a_pathway_that_does_not_classify_is_refused():
    with pytest.raises(ValueError, match=r"'head' \(decoding\), which outputs logits, not classes"):
        Classifier(LocalExecutor(SPEC), "text")
