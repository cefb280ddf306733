"""DiLoCo jobs on the real coordinator: an embedded broker, a real worker, one task per worker.

On examples/tiny.yaml: with inner SGD, H=1, plain-averaging outer SGD (lr 1, no momentum), a
constant learning rate, no clipping, no compression and equal tokens per worker, a DiLoCo job is
synchronous data-parallel SGD (gradients averaged over the K shards each step); a job cancelled
after a round and resubmitted equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from pathways import data as data_lib
from pathways import spec as spec_lib
from pathways import tokenizers
from pathways.coordinator.testing import (
    cancel_and_resubmit,
    coordinator,
    metrics,
    wait_for_progress,
)
from pathways.executor.local import LocalExecutor
from pathways.parallel import diloco
from pathways.parallel.diloco_job import DiLoCoRequest, DiLoCoRun

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")
K = 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("broker")


@pytest.fixture(scope="module")
def client(broker_dir):
    """An embedded broker and one worker with K + 1 pool processes (the job waits in one)."""
    with coordinator(broker_dir, concurrency=K + 1) as c:
        yield c


def job(out: Path, **kw) -> DiLoCoRequest:
    args = dict(
        spec=TINY,
        out=str(out),
        workers=K,
        batch_size=4,
        seq_len=32,
        max_data_mb=0.3,
        eval_batches=2,
    )
    args.update(kw)
    return DiLoCoRequest(**args)


def final_params(req: DiLoCoRequest) -> dict:
    run = DiLoCoRun(req)
    assert run.start() == req.rounds
    return run.params()


def test_h1_plain_averaging_job_equals_synchronous_data_parallel_sgd(client, broker_dir, tmp_path):
    lr, steps = 0.05, 3
    req = job(
        tmp_path / "diloco",
        steps=steps,
        inner_steps=1,
        inner="sgd",
        lr=lr,
        clip=0.0,
        outer_lr=1.0,
        outer_momentum=0.0,
        compress="none",
        eval_every=steps,
    )
    seen = []
    st = client.follow(client.submit(req), timeout=300, on_progress=seen.append)
    assert st["state"] == "SUCCESS", st
    pids = [s for s in seen if s["state"] == "PROGRESS"]
    assert pids and all(len(set(s["worker_pids"]) | {s["pid"]}) == K + 1 for s in pids)

    # The reference: the same data, shards and initial parameters, one SGD step per batch of K.
    spec = spec_lib.load(TINY)
    texts = data_lib.read_texts(data_lib.default_corpus_paths(), int(0.3e6))
    tokens = data_lib.TokenData.build(texts, tokenizers.ByteTokenizer()).train
    shards = [diloco.shard(tokens, K, k) for k in range(K)]
    ref = LocalExecutor(spec, seed=0)
    names = spec.pathway("tiny").modules
    mean_losses = []
    for t in range(steps):
        outs = [
            ref.loss_and_grads("tiny", *diloco.shard_batch(shards[k], k, t, 4, 32, 0))
            for k in range(K)
        ]
        mean_losses.append(float(np.mean([float(loss) for loss, _ in outs])))
        for n in names:
            mean = jax.tree.map(lambda *g: sum(g) / K, *[g[n] for _, g in outs])
            ref.set_state(n, jax.tree.map(lambda p, g: p - lr * g, ref.state(n), mean))

    assert [r["loss"] for r in metrics(tmp_path / "diloco")] == pytest.approx(mean_losses, rel=1e-5)
    got = final_params(req)
    for n in names:
        for a, b in zip(jax.tree.leaves(got[n]), jax.tree.leaves(ref.state(n))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert mean_losses[-1] < mean_losses[0]  # it did train
    # The worker's tasks compiled into the shared cache (`coordinator.worker.use_compile_cache`),
    # and what they computed through it equals the reference above.
    assert list((broker_dir / "xla-cache").glob("*-cache"))


def assert_same_run(ref: DiLoCoRequest, req: DiLoCoRequest) -> None:
    a, b = metrics(Path(ref.out)), metrics(Path(req.out))
    assert [r["round"] for r in b] == list(range(1, req.rounds + 1))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6), ra["round"]
        assert ("eval_loss" in rb) == ("eval_loss" in ra) == (ra["round"] % 3 == 0)
        if "eval_loss" in ra:
            assert rb["eval_loss"] == pytest.approx(ra["eval_loss"], rel=1e-6)
    pa, pb = final_params(ref), final_params(req)
    for n in pa:
        for x, y in zip(jax.tree.leaves(pa[n]), jax.tree.leaves(pb[n])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_job_resumed_from_a_round_checkpoint_equals_an_uninterrupted_one(client, tmp_path):
    # AdamW inner steps and Nesterov outer steps: every piece of state crosses the interruption.
    settings = dict(steps=12, inner_steps=2, lr=1e-2, eval_every=3, save_every=3)
    ref = job(tmp_path / "ref", **settings)
    assert client.follow(client.submit(ref), timeout=300)["state"] == "SUCCESS"

    # Cancelled after a round, then submitted again.
    req = job(tmp_path / "cut", **settings)
    cancel_and_resubmit(client, req)
    assert_same_run(ref, req)

    # The job's own process killed mid-job: Celery redelivers it and it resumes by itself.
    req = job(tmp_path / "killed", **settings)
    killed = client.submit(req)
    os.kill(wait_for_progress(client, killed)["pid"], signal.SIGKILL)
    final = client.follow(killed, timeout=300)
    assert final["state"] == "SUCCESS", final
    assert 1 <= final["resumed_from"] < req.rounds
    assert_same_run(ref, req)


def test_a_worker_killed_mid_round_is_left_out_and_its_shard_trained_again(client, tmp_path):
    out = tmp_path / "faulty"
    # round_deadline only backs the test up: the killed task's redelivery reports it lost first.
    req = job(out, steps=40, inner_steps=20, lr=1e-2, eval_every=2, round_deadline=120)
    job_id = client.submit(req)
    claims = out / "diloco" / "round-000000" / "claims"
    deadline = time.monotonic() + 180
    while not (pid := _claimed_pid(claims, 1)):
        assert time.monotonic() < deadline, client.status(job_id)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)  # worker 1's process, inside round 0
    final = client.follow(job_id, timeout=300)
    assert final["state"] == "SUCCESS", final
    first, second = metrics(out)
    assert first["workers_reported"] == [0] and first["workers_lost"] == [1]
    assert second["workers_reported"] == [0, 1] and second["workers_lost"] == []
    meta = json.loads((out / "train" / "meta.json").read_text())
    assert meta["round"] == 2
    assert meta["positions"] == [40, 20]  # worker 1's shard from batch 0 again in round 1
    assert np.isfinite(final["eval_loss"]) and second["loss"] < first["loss"]


def _claimed_pid(claims: Path, k: int) -> int | None:
    for f in claims.glob(f"worker-{k}.*"):
        text = f.read_text()
        if text:
            return int(text)
    return None


def test_too_few_worker_processes_fail_the_job_with_the_numbers(client, tmp_path):
    big = job(tmp_path / "big", workers=3, steps=2, inner_steps=1)
    st = client.follow(client.submit(big), timeout=120)
    assert st["state"] == "FAILURE"
    assert "with 3 workers needs 4 coordinator worker processes" in st["error"]
    assert "have 3" in st["error"]


def test_cli_submits_a_diloco_job_and_follows_it(client, tmp_path, capsys):
    from tools.cli.main import main

    out = tmp_path / "cli"
    argv = ["train", "--spec", TINY, "--out", str(out), "--max-data-mb", "0.3"]
    argv += ["--batch-size", "4", "--seq-len", "32", "--steps", "4", "--eval-every", "1"]
    argv += ["--parallel", "diloco", "--workers", str(K), "--inner-steps", "2"]
    argv += ["--compress", "bfloat16", "--broker", client.app.conf.broker_url]
    assert main(argv) == 0, capsys.readouterr().err
    stdout, stderr = capsys.readouterr()
    assert f"{K} workers x 2 rounds of 2 inner steps" in stderr
    assert "MB exchanged; checkpoint" in stdout
    assert [r["round"] for r in metrics(out)] == [1, 2]
    assert {p.name for p in (out / "modules").iterdir()} == {"embed", "attn-0", "attn-1", "head"}
