"""Pipelined training steps over in-process stages against the single-program step."""

import jax
import numpy as np
import pytest

from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.pipeline.runner import PipelineError, run_step
from pathways.pipeline.stage import LocalStage
from pathways.train import FusedEngine, TrainConfig, make_optimizer

SPEC = spec_lib.from_dict(
    {
        "modules": {
            "embed": {"kind": "embedding", "vocab_size": 37, "d_model": 24, "max_seq_len": 16},
            "a0": {
                "kind": "attention",
                "d_model": 24,
                "n_layers": 2,
                "n_heads": 3,
                "max_seq_len": 16,
            },
            "a1": {
                "kind": "attention",
                "d_model": 24,
                "n_layers": 1,
                "n_heads": 2,
                "max_seq_len": 16,
                "n_kv_heads": 1,
                "norm": "rmsnorm",
                "mlp": "swiglu",
                "positions": "rope",
            },
            "head": {"kind": "decoding", "d_model": 24, "vocab_size": 37},
        },
        "pathways": {"p": ["embed", "a0", "a1", "head"]},
    }
)


def batch(b=8, t=12):
    toks = np.random.default_rng(1).integers(0, 37, (b, t + 1)).astype(np.int32)
    return toks[:, :-1], toks[:, 1:]


def rel_err(a, b) -> float:
    """Max abs difference over a module's tree, relative to the tree's largest magnitude."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(la, lb))
    return diff / max(float(np.abs(np.asarray(y)).max()) for y in lb)


@pytest.fixture(scope="module")
def reference():
    """Loss and per-module gradients of the whole batch in one program."""
    return LocalExecutor(SPEC).loss_and_grads("p", *batch())


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("n_micro", [1, 2, 8])
def test_pipeline_gradients_equal_the_single_program_gradients(reference, schedule, n_micro):
    inputs, targets = batch()
    loss, grads = reference
    tx = make_optimizer(TrainConfig(steps=10, warmup=1))
    stages = [LocalStage(rt, tx) for rt in LocalExecutor(SPEC).chain("p")]
    out = run_step(stages, inputs, targets, n_micro, schedule, apply=False)
    assert out["loss"] == pytest.approx(float(loss), rel=1e-5)
    for st in stages:
        assert rel_err(st.accumulated(), grads[st.name]) <= 1e-5, st.name


def test_pipeline_step_updates_parameters_like_the_fused_step():
    inputs, targets = batch()
    cfg = TrainConfig(steps=10, warmup=1, lr=1e-2)
    fused_ex, pipe_ex = LocalExecutor(SPEC), LocalExecutor(SPEC)
    fused = FusedEngine(fused_ex, "p", make_optimizer(cfg))
    stages = [LocalStage(rt, make_optimizer(cfg)) for rt in pipe_ex.chain("p")]
    for _ in range(3):  # step 0 has lr 0 (warmup from zero); later steps move parameters
        inputs, targets = batch()
        fused.step(inputs, targets)
        run_step(stages, inputs, targets, 4, "1f1b")
    for name in SPEC.pathway("p").modules:
        assert rel_err(pipe_ex.state(name), fused_ex.state(name)) <= 1e-5, name
        assert rel_err(pipe_ex.state(name), LocalExecutor(SPEC).state(name)) > 1e-3  # it moved


def test_indivisible_batch_is_refused():
    inputs, targets = batch(b=6)
    stages = [
        LocalStage(rt, make_optimizer(TrainConfig())) for rt in LocalExecutor(SPEC).chain("p")
    ]
    with pytest.raises(ValueError, match="batch size 6 is not divisible into 4 micro-batches"):
        run_step(stages, inputs, targets, 4)


def test_a_failing_stage_fails_the_step_fast_and_leaves_no_state_behind():
    inputs, targets = batch()
    stages = [
        LocalStage(rt, make_optimizer(TrainConfig())) for rt in LocalExecutor(SPEC).chain("p")
    ]
    with pytest.raises(PipelineError, match="stage 'head' failed in F0"):
        run_step(stages, inputs, targets[:, :5], 2)  # targets shorter than the inputs
    assert all(not st.pending for st in stages)
    # The stages are usable again: a good step runs.
    assert np.isfinite(run_step(stages, inputs, targets, 2)["loss"])


def test_a_stage_changes_its_mask_between_steps_only():
    """Pathways of different masks train a shared module in turn (issue 19): set_causal swaps
    the stage's programs; the same mask is a no-op, another one with a forward pending is
    refused (its backward would use the other mask)."""
    ex = LocalExecutor(SPEC, seed=0)
    st = LocalStage(ex.runtimes["a0"], make_optimizer(TrainConfig(steps=2, warmup=1)))
    x = np.random.default_rng(0).standard_normal((2, 5, 24)).astype(np.float32)
    causal = np.asarray(st.evaluate(x))
    st.set_causal(False)
    both_ways = np.asarray(st.evaluate(x))
    assert not np.allclose(causal[:, 0], both_ways[:, 0])  # the first position now sees the rest
    st.forward(0, x)
    st.set_causal(False)  # unchanged: fine mid-step
    with pytest.raises(ValueError, match=r"between steps only; micro-batches \[0\]"):
        st.set_causal(True)
    st.backward(0, np.ones_like(x))
    st.apply()
    st.set_causal(True)  # the step is over
    assert st.causal and not st.pending


def test_lr_scale_scales_a_stages_update():
    """A task's mixing weight on a shared module (issue 19): lr_scale 0.5 halves the update."""
    x = np.random.default_rng(1).standard_normal((2, 5, 24)).astype(np.float32)
    moved = []
    for scale in (1.0, 0.5):
        ex = LocalExecutor(SPEC, seed=0)
        before = jax.tree.map(np.asarray, ex.state("a0"))
        st = LocalStage(ex.runtimes["a0"], make_optimizer(TrainConfig(steps=4, warmup=1, lr=1e-2)))
        for _ in range(2):  # the first step of the warm-up has learning rate 0
            st.lr_scale = scale
            st.forward(0, x)
            st.backward(0, np.ones_like(x))
            st.apply()
        moved.append(jax.tree.map(lambda a, b: np.float64(a) - b, st.rt.state, before))
    # Within two float32 ulps of the parameters the deltas were taken from.
    jax.tree.map(
        lambda h, f, p: np.testing.assert_array_less(
            np.abs(h - 0.5 * f), 2 * np.spacing(np.float32(np.abs(p) + np.abs(f))) + 1e-12
        ),
        moved[1],
        moved[0],
        jax.tree.map(np.asarray, LocalExecutor(SPEC, seed=0).state("a0")),
    )
