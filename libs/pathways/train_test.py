"""Tests for local training: resume reproduces an uninterrupted run; metrics; config checks."""

import json

import jax
import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.config import ConfigError
from pathways.data import TokenData
from pathways.executor.local import LocalExecutor
from pathways.tokenizers import ByteTokenizer
from pathways.train import LocalTrainer, TrainConfig

SPEC = spec_lib.from_dict(
    {
        "modules": {
            "embed": {"kind": "embedding", "vocab_size": 37, "d_model": 24, "max_seq_len": 16},
            "attn": {
                "kind": "attention",
                "d_model": 24,
                "n_layers": 2,
                "n_heads": 3,
                "max_seq_len": 16,
            },
            "head": {"kind": "decoding", "d_model": 24, "vocab_size": 37},
        },
        "pathways": {"p": ["embed", "attn", "head"]},
    }
)
CFG = TrainConfig(
    steps=8,
    batch_size=4,
    seq_len=15,
    lr=1e-2,
    warmup=2,
    eval_every=3,
    eval_batches=2,
    save_every=4,
    seed=3,
)


def _data():
    # A learnable stream: a repeating pattern of 7 tokens with some noise.
    rng = np.random.default_rng(0)
    tokens = np.tile(np.arange(7, dtype=np.int32) * 5 % 37, 400)
    noise = rng.random(tokens.shape) < 0.1
    tokens[noise] = rng.integers(0, 37, noise.sum())
    return TokenData(train=tokens[:2400], eval=tokens[2400:])


def _trainer(out, ex=None):
    # A byte tokenizer only names the checkpoint's tokenizer here; the data is synthetic.
    ex = ex or LocalExecutor(SPEC, seed=0)
    return LocalTrainer(ex, "p", CFG, _data(), out, ByteTokenizer())


def test_resume_gives_the_same_loss_curve_as_an_uninterrupted_run(tmp_path):
    straight_ex, resumed_ex = LocalExecutor(SPEC, seed=0), LocalExecutor(SPEC, seed=0)
    history = _trainer(tmp_path / "a", straight_ex).run()
    assert [r["step"] for r in history] == list(range(1, 9))
    assert history[-1]["loss"] < history[0]["loss"] - 0.3  # it learns

    first = _trainer(tmp_path / "b")
    part = first.run(should_stop=lambda: first.step >= 5)  # stops after step 5
    assert len(part) == 5
    resumed = _trainer(tmp_path / "b", resumed_ex)  # a fresh process's view: new executor
    assert resumed.try_resume() and resumed.step == 4  # the last save; step 5 is redone
    rest = resumed.run()
    assert [r["step"] for r in rest] == [5, 6, 7, 8]

    losses = [r["loss"] for r in history]
    np.testing.assert_allclose([r["loss"] for r in part[:4] + rest], losses, rtol=0, atol=1e-6)
    np.testing.assert_allclose(part[4]["loss"], losses[4], rtol=0, atol=1e-6)
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    assert [s for s, _ in evals] == [3, 6, 8]
    np.testing.assert_allclose(
        [r["eval_loss"] for r in part[:4] + rest if "eval_loss" in r],
        [e for _, e in evals],
        rtol=0,
        atol=1e-6,
    )
    for name in ("embed", "attn", "head"):
        for x, y in zip(
            jax.tree.leaves(straight_ex.state(name)), jax.tree.leaves(resumed_ex.state(name))
        ):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)

    # metrics.jsonl: one record per step run, appended across the interruption (an append-only
    # log: step 5 ran twice); its latest record per step is the uninterrupted curve.
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()]
    assert [r["step"] for r in records][:4] == [1, 2, 3, 4] and records[-1]["step"] == 8
    latest = {r["step"]: r for r in records}
    assert sorted(latest) == list(range(1, 9))
    np.testing.assert_allclose([latest[s]["loss"] for s in range(1, 9)], losses, rtol=0, atol=1e-6)
    assert all(r["tokens_per_s"] > 0 for r in records)
    assert [s for s in range(1, 9) if "eval_loss" in latest[s]] == [3, 6, 8]
    # The checkpoint: spec, tokenizer config, every module, optimizer state and metadata.
    out = tmp_path / "b"
    assert (out / "spec.yaml").exists()
    assert sorted(p.name for p in (out / "modules").iterdir()) == ["attn", "embed", "head"]
    meta = json.loads((out / "train" / "meta.json").read_text())
    assert meta["step"] == 8 and meta["pathway"] == "p" and meta["config"]["lr"] == 1e-2


def test_resume_of_another_pathways_run_is_refused(tmp_path):
    from pathways import checkpoint as ckpt

    ckpt.write_meta(tmp_path, {"step": 3, "pathway": "other"})
    with pytest.raises(ValueError, match="holds a run of pathway 'other', not 'p'"):
        _trainer(tmp_path).try_resume()
    assert not _trainer(tmp_path / "empty").try_resume()


def test_seq_len_over_the_pathway_limit_is_refused(tmp_path):
    cfg = TrainConfig(steps=2, seq_len=17, warmup=0)
    with pytest.raises(
        ValueError, match="max sequence length exceeded: seq_len 17 > pathway 'p' " "max_seq_len 16"
    ):
        LocalTrainer(LocalExecutor(SPEC), "p", cfg, _data(), tmp_path, ByteTokenizer())


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(steps=0), ["steps", "0"]),
        (dict(batch_size=2.5), ["batch_size", "2.5"]),
        (dict(lr=0.0), ["lr", "0.0"]),
        (dict(steps=10, warmup=10), ["warmup", "10"]),
    ],
)
def test_train_config_validation(kwargs, words):
    with pytest.raises(ValueError) as e:
        TrainConfig(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_with_warmup_defaults_to_a_fifteenth_and_fit_caps_it_below_steps():
    assert TrainConfig.with_warmup(300, lr=0.5).warmup == 20
    assert TrainConfig.with_warmup(10).warmup == 1
    assert TrainConfig.with_warmup(10, 0).warmup == 0
    assert TrainConfig.with_warmup(1, fit=True).warmup == 0
    assert TrainConfig.with_warmup(10, 50, fit=True).warmup == 9
    with pytest.raises(ConfigError, match=r"warmup must be in \[0, steps=10\), got 50"):
        TrainConfig.with_warmup(10, 50)
    with pytest.raises(ConfigError, match="lr must be a positive number, got '1e-3'"):
        TrainConfig(lr="1e-3")


def test_lr_scale_scales_one_modules_updates(tmp_path):
    """Issue 19's task mixing weight: lr_scale {attn: 0.5} halves attn's updates (AdamW's update
    is lr x (...)) and leaves the other modules' exactly as without it."""
    cfg = TrainConfig(steps=2, batch_size=4, seq_len=15, lr=1e-2, warmup=1, eval_every=2)
    start = LocalExecutor(SPEC, seed=0)
    after = {}
    for name, scale in (("full", None), ("half", {"attn": 0.5})):
        ex = LocalExecutor(SPEC, seed=0)
        LocalTrainer(ex, "p", cfg, _data(), tmp_path / name, ByteTokenizer(), lr_scale=scale).run()
        after[name] = {m: ex.state(m) for m in ("embed", "attn", "head")}
    for m in ("embed", "head"):
        jax.tree.map(np.testing.assert_array_equal, after["half"][m], after["full"][m])

    # Within two float32 ulps of the largest of the values the update was added to / gave.
    def halfway(h, f, p0):
        h, f, p0 = (np.asarray(a) for a in (h, f, p0))
        want = np.float64(p0) + 0.5 * (np.float64(f) - np.float64(p0))
        ulp = np.spacing(np.maximum.reduce([np.abs(h), np.abs(f), np.abs(p0)]))
        assert (np.abs(h - want) <= 2 * ulp).all()

    jax.tree.map(halfway, after["half"]["attn"], after["full"]["attn"], start.state("attn"))
    with pytest.raises(ValueError, match=r"lr_scale of 'attn' must be > 0"):
        LocalTrainer(
            start, "p", cfg, _data(), tmp_path / "z", ByteTokenizer(), lr_scale={"attn": 0}
        )
    with pytest.raises(ValueError, match="lr_scale names module"):
        LocalTrainer(start, "p", cfg, _data(), tmp_path / "z", ByteTokenizer(), lr_scale={"x": 2})
