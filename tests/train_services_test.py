"""Pipeline training through module services (each module its own process) against local."""

from __future__ import annotations

import time

import grpc
import jax
import numpy as np
import pytest

from pathways import checkpoint as ckpt
from pathways import messages
from pathways.deploy.launcher import Fleet, free_port
from pathways.executor.local import LocalExecutor
from pathways.pipeline.client import RemoteStage, RemoteStageError, remote_stages
from pathways.pipeline.runner import PipelineError, run_step
from pathways.pipeline.stage import LocalStage
from pathways.serving.testing import make_checkpoint
from pathways.train import PipelineEngine, TrainConfig, make_optimizer
from pathways.v1 import training_pb2

pytestmark = pytest.mark.slow
MODULES = ["embed", "attn-0", "attn-1", "head"]
CFG = TrainConfig(steps=20, warmup=1, lr=1e-2, batch_size=8, seq_len=16)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(directory)
    with Fleet(str(directory), MODULES, gateway=False, module_args=["--training"]) as f:
        yield f, directory


def batch(seed: int):
    toks = np.random.default_rng(seed).integers(0, 257, (8, 17)).astype(np.int32)
    return toks[:, :-1], toks[:, 1:]


def update_error(before, after, ref_after) -> float:
    """How far a module's update (after - before) is from the reference's, relative to the
    reference update's size (L2 over all the module's parameters, in float64)."""
    b, a, r = (
        [np.asarray(x, np.float64) for x in jax.tree.leaves(t)] for t in (before, after, ref_after)
    )
    diff = sum(float(((x - y) ** 2).sum()) for x, y in zip(a, r))
    size = sum(float(((y - z) ** 2).sum()) for y, z in zip(r, b))
    return (diff / size) ** 0.5


def local_reference(directory, schedule: str, n_micro: int, steps: int):
    """The same steps in this process, from the same checkpoint."""
    spec, _ = ckpt.load_spec(directory)
    ex = LocalExecutor(spec)
    for m in MODULES:
        ex.set_state(m, ckpt.load_module(directory, m, ex.state(m)))
    stages = [LocalStage(rt, make_optimizer(CFG)) for rt in ex.chain("tiny")]
    return ex, [run_step(stages, *batch(s), n_micro, schedule) for s in range(steps)]


@pytest.mark.parametrize(
    "schedule,n_micro,transfer",
    [("1f1b", 4, "direct"), ("gpipe", 2, "direct"), ("1f1b", 1, "direct"), ("1f1b", 4, "relay")],
)
def test_steps_through_services_match_the_local_executor(
    fleet, tmp_path, schedule, n_micro, transfer
):
    f, directory = fleet
    spec, _ = ckpt.load_spec(directory)
    addresses = {m: f.endpoints[m][0] for m in MODULES}
    # Every run starts from the checkpoint's weights: reload them into the servers first.
    stages = remote_stages(spec, "tiny", addresses, CFG)
    try:
        for st in stages:
            st.load(directory)  # parameters only: the checkpoint has no optimizer state
        engine = PipelineEngine(stages, n_micro, schedule, transfer=transfer)
        outs = [engine.step(*batch(s)) for s in range(3)]
        # Direct: only the inputs, targets and losses pass through this process.
        k = len(MODULES)
        assert all(o["wire_bytes"] > 0 for o in outs)
        assert (engine._direct is not None) == (transfer == "direct") and k == 4
        out = tmp_path / "saved"
        for st in stages:
            st.save(out)
    finally:
        for st in stages:
            st.close()
    ex, ref = local_reference(directory, schedule, n_micro, 3)
    # Both paths run the same jitted programs, but nothing makes XLA sum in the same order in
    # every process and on every CPU, and the paths may legitimately differ by float32 rounding.
    # Measured with summation orders changed on purpose (micro-batch splits 1/2/4 of the same
    # batch; XLA fast-math): losses agree to 3.4e-7, per-module gradient norms to 4.7e-7, every
    # gradient element to 1.6e-6 of the module's largest.
    assert [o["loss"] for o in outs] == pytest.approx([o["loss"] for o in ref], rel=1e-5)
    for o, r in zip(outs, ref):  # per-module gradients (before clipping), through their norms
        for m in MODULES:
            assert o["grad_norms"][m] == pytest.approx(r["grad_norms"][m], rel=1e-5), m
    # The parameters cannot be held to that. AdamW divides each element's step by sqrt(v) + 1e-8,
    # so an element whose gradient is below ~1e-8 takes a step set by rounding noise: the k
    # projections' biases have an exactly zero gradient (softmax ignores a shift shared by all
    # keys), float32 leaves ~1e-11 of noise, and AdamW turns it into steps of lr * g / 1e-8 ~
    # 3e-5 whose sign follows the summation order. Rare tokens' embedding rows (gradients
    # ~3e-7, rounding ~6e-9) are amplified the same way, less. So with gradients agreeing to
    # 5e-7, the parameters after 3 steps differed by up to 3.5e-5 (attention) and 6.5e-6
    # (embedding: 7e-5 of its largest weight; the failures, against 1e-5 of it, were
    # 2.1e-5 and 3.4e-5). Hence each module's update (after - before) is compared, relative to
    # the update's norm: measured <= 1.8e-5 across those summation orders. The k biases' noise alone stays under 2.5e-4 (all 256 of
    # an attention module's taking opposite 3e-5 steps in both steps: 1.9e-3, against an update
    # of norm 7.6). Real errors, measured locally on the same batches: no weight decay 2.8e-3,
    # b2 0.999 for 0.95 1.1e-2, no clipping 4e-2, one micro-batch of four missing 0.6, the lr
    # schedule a step off 1.2. A gradient scale error, which clipping and AdamW's normalization
    # hide from the parameters, is what the gradient norms above catch.
    for m in MODULES:
        before = ckpt.load_module(directory, m, ex.state(m))
        remote_params = ckpt.load_module(out, m, ex.state(m))
        assert update_error(before, remote_params, ex.state(m)) <= 1e-3, m


def test_training_calls_out_of_order_or_malformed_get_clear_statuses(fleet):
    f, directory = fleet
    spec, _ = ckpt.load_spec(directory)
    addresses = {m: f.endpoints[m][0] for m in MODULES}
    stages = remote_stages(spec, "tiny", addresses, CFG)
    head, attn = stages[3], stages[1]
    try:
        with pytest.raises(RemoteStageError, match="NOT_FOUND: micro_batch 7 has no forward"):
            attn.backward(7, np.zeros((2, 4, 128), np.float32))
        with pytest.raises(RemoteStageError, match=r"INVALID_ARGUMENT: input has d_model 64"):
            attn.forward(0, np.zeros((2, 4, 64), np.float32))
        with pytest.raises(RemoteStageError, match="targets are required by decoding module"):
            head.forward(0, np.zeros((2, 4, 128), np.float32))
        with pytest.raises(RemoteStageError, match="NOT_FOUND: this server hosts module 'head'"):
            remote_stages(spec, "tiny", {**addresses, "attn-0": addresses["head"]}, CFG)
        attn.forward(0, np.zeros((2, 4, 128), np.float32))
        with pytest.raises(RemoteStageError, match="FAILED_PRECONDITION: micro-batches \\[0\\]"):
            attn.apply()
        attn.reset()
        # A step that fails in one stage fails the whole step, and the stages are reset.
        inputs, targets = batch(0)
        with pytest.raises(PipelineError, match="stage 'head' failed in F0"):
            run_step(stages, inputs, targets[:, :3], 2)
        assert np.isfinite(run_step(stages, inputs, targets, 2)["loss"])
        # Named optimizers (multi-task runs): bad names and configs, and Apply naming none of
        # them, get INVALID_ARGUMENT naming the field; the stage keeps training.
        good, bad = messages.optimizer_config(CFG), training_pb2.OptimizerConfig(lr=1e-2)
        for optimizers, match in (
            ([("a/b", good)], r"optimizers\[0\].name must match"),
            ([("text", good), ("text", good)], r"optimizers\[1\].name 'text' is given twice"),
            ([("text", good), ("digits", bad)], r"optimizers\[1\].optimizer.steps"),
        ):
            req = training_pb2.ConfigureRequest(module="attn-0", optimizer=good)
            for name, opt in optimizers:
                req.optimizers.add(name=name, optimizer=opt)
            with pytest.raises(RemoteStageError, match="INVALID_ARGUMENT: " + match):
                attn._call("Configure", req)
        attn.configure(CFG, optimizers={"text": CFG, "digits": CFG})
        attn.forward(0, np.zeros((2, 4, 128), np.float32))
        attn.backward(0, np.zeros((2, 4, 128), np.float32))
        attn.use("speech")
        with pytest.raises(RemoteStageError, match="INVALID_ARGUMENT: optimizer: .*no optimizer"):
            attn.apply()
        attn.use("digits")
        assert attn.apply()["grad_norm"] == 0.0
    finally:
        for st in stages:
            st.close()


def test_direct_steps_fail_cleanly_and_never_hang(fleet):
    """Bad plans get INVALID_ARGUMENT; a stage that cannot reach its neighbour fails the step
    (the others abort instead of waiting), and the next step works."""
    f, directory = fleet
    spec, _ = ckpt.load_spec(directory)
    addresses = {m: f.endpoints[m][0] for m in MODULES}
    stages = remote_stages(spec, "tiny", addresses, CFG)
    inputs, targets = batch(0)
    try:
        with pytest.raises(grpc.RpcError) as e:
            stages[1]._stub.RunStep(
                training_pb2.RunStepRequest(
                    step=1, schedule="1f1b", micro_batches=2, stage=5, stages=4
                )
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "stage 5 is outside [0, stages = 4)" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stages[1]._stub.RunStep(
                training_pb2.RunStepRequest(step=1, schedule="zigzag", micro_batches=2, stages=4)
            )
        assert "schedule must be one of gpipe, 1f1b; got 'zigzag'" in e.value.details()
        # Targets that do not fit: the head fails, the other stages abort, nothing hangs.
        t0 = time.monotonic()
        with pytest.raises(PipelineError, match="stage 'head' at .* failed in RunStep"):
            RemoteStage.direct_step(stages, inputs, targets[:, :3], 2)
        # A neighbour that is not there: attn-0 cannot deliver to "attn-1".
        real = stages[2].address
        stages[2].address = f"127.0.0.1:{free_port()}"
        try:
            with pytest.raises(PipelineError, match="stage 'attn-0' .* neighbouring stage at"):
                RemoteStage.direct_step(stages, inputs, targets, 2, timeout=60)
        finally:
            stages[2].address = real
        assert time.monotonic() - t0 < 60
        # A driver that dies after starting only some stages: their waits end (the call is
        # gone; or a new run's Configure aborts them) instead of holding the module for the
        # step's whole deadline.
        calls = [
            stages[i]._stub.RunStep.future(
                training_pb2.RunStepRequest(
                    step=99,
                    schedule="1f1b",
                    micro_batches=2,
                    stage=i,
                    stages=4,
                    next=stages[i + 1].address,
                    previous=stages[i - 1].address,
                ),
                timeout=600,
            )
            for i in (1, 2)
        ]
        time.sleep(0.5)
        calls[0].cancel()
        t0 = time.monotonic()
        stages[1].configure(CFG)  # the cancelled step's wait ended
        stages[2].configure(CFG)  # Configure aborted the step still waiting
        assert time.monotonic() - t0 < 10
        with pytest.raises(grpc.RpcError) as e:
            calls[1].result(timeout=10)
        assert e.value.code() == grpc.StatusCode.ABORTED
        out = RemoteStage.direct_step(stages, inputs, targets, 2)
        assert np.isfinite(out["loss"]) and set(out["stage_seconds"]) == set(MODULES)
        for st in stages:
            st.apply()
    finally:
        for st in stages:
            st.close()
