"""The Celery coordinator against a real Redis-protocol server and a real worker process."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from pathways.coordinator import worker
from pathways.coordinator.app import make_app
from pathways.coordinator.broker import EmbeddedBroker
from pathways.coordinator.client import JobClient
from pathways.coordinator.jobs import JobRequest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")

pytestmark = pytest.mark.slow


def small_job(out: Path, **kw) -> JobRequest:
    args = dict(
        spec=TINY,
        out=str(out),
        steps=30,
        batch_size=8,
        seq_len=32,
        max_data_mb=0.3,
        eval_every=10,
        save_every=5,
        engine="pipeline",
        micro_batches=2,
        warmup=3,
    )
    args.update(kw)
    return JobRequest(**args)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """An embedded broker and one worker process (prefork, one pool process)."""
    with EmbeddedBroker(workdir=tmp_path_factory.mktemp("broker")) as broker:
        proc = worker.spawn(broker.url)
        try:
            yield JobClient(make_app(broker.url)), proc
        finally:
            worker.stop(proc)


def wait_for_step(client: JobClient, job_id: str, step: int, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.status(job_id)
        if st["state"] in ("FAILURE", "SUCCESS", "REVOKED", "CANCELLED"):
            raise AssertionError(f"job ended before step {step}: {st}")
        if st["state"] == "PROGRESS" and st.get("step", 0) >= step:
            return st
        time.sleep(0.1)
    raise AssertionError(f"job did not reach step {step} in {timeout} s")


def final_losses(out: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a resumed run's re-done steps overwrite the earlier ones."""
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def test_job_runs_to_completion_with_progress_metrics_and_plot(coordinator, tmp_path):
    client, _ = coordinator
    job = client.submit(small_job(tmp_path / "run", steps=12))
    seen = []
    st = client.follow(job, timeout=300, on_progress=seen.append)
    assert st["state"] == "SUCCESS", st
    progress = [s for s in seen if s["state"] == "PROGRESS"]
    assert progress and all(
        {"step", "loss", "tokens_per_s", "stage_seconds"} <= set(s) for s in progress
    )
    assert set(progress[-1]["stage_seconds"]) == {"embed", "attn-0", "attn-1", "head"}
    assert st["step"] == 12 and st["eval_loss"] is not None
    out = tmp_path / "run"
    assert len(final_losses(out)) == 12
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (out / "modules").iterdir()} == {"embed", "attn-0", "attn-1", "head"}
    assert job in {j["id"] for j in client.list()}


def test_cancel_stops_the_job_and_keeps_its_last_checkpoint(coordinator, tmp_path):
    client, _ = coordinator
    out = tmp_path / "run"
    job = client.submit(small_job(out, steps=2000, save_every=1000))
    wait_for_step(client, job, 3)
    client.cancel(job)
    st = client.follow(job, timeout=120)
    assert st["state"] == "CANCELLED", st
    meta = json.loads((out / "train" / "meta.json").read_text())
    assert 3 <= meta["step"] < 2000
    assert max(final_losses(out)) == meta["step"]  # the checkpoint is the last finished step


def test_killed_worker_process_resumes_from_checkpoint_to_the_same_losses(coordinator, tmp_path):
    client, _ = coordinator
    ref = client.submit(small_job(tmp_path / "ref", steps=24))
    assert client.follow(ref, timeout=300)["state"] == "SUCCESS"

    out = tmp_path / "killed"
    job = client.submit(small_job(out, steps=24))
    st = wait_for_step(client, job, 12)  # checkpoints every 5 steps: the last one is step 10
    os.kill(st["pid"], signal.SIGKILL)
    final = client.follow(job, timeout=300)
    assert final["state"] == "SUCCESS", final
    assert 5 <= final["resumed_from"] < 24 and final["resumed_from"] % 5 == 0
    expected, got = final_losses(tmp_path / "ref"), final_losses(out)
    assert sorted(got) == sorted(expected) == list(range(1, 25))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_bad_spec_and_unreadable_data_fail_with_a_clear_error(coordinator, tmp_path):
    client, worker = coordinator
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text(
        "modules: {embed: {kind: embedding, vocab_size: 0, d_model: 8, "
        "max_seq_len: 8}}\npathways: {p: [embed]}\n"
    )
    job = client.submit(small_job(tmp_path / "a", spec=str(bad_spec)))
    st = client.follow(job, timeout=120)
    assert st["state"] == "FAILURE"
    assert "vocab_size must be a positive integer, got 0" in st["error"]

    job = client.submit(small_job(tmp_path / "b", data=(str(tmp_path / "missing"),)))
    st = client.follow(job, timeout=120)
    assert st["state"] == "FAILURE"
    assert f"data path {tmp_path / 'missing'} does not exist" in st["error"]
    assert worker.poll() is None  # the worker survives bad jobs


def test_jobs_read_and_write_only_under_the_workers_job_roots(coordinator, tmp_path):
    """A job once read and wrote any path the worker could: out, data and spec must now lie
    under PATHWAYS_JOB_ROOTS (default: the worker's working and temporary directories)."""
    client, worker = coordinator
    outside = Path("/var/pathways-victim")
    for job, field in [
        (small_job(outside / "out"), "out"),
        (small_job(tmp_path / "c", data=("/etc/passwd",)), "data[0]"),
        (small_job(tmp_path / "d", spec="/etc/hostname"), "spec"),
    ]:
        st = client.follow(client.submit(job), timeout=120)
        assert st["state"] == "FAILURE", st
        assert f"{field} " in st["error"] and "is outside the allowed directories" in st["error"]
        assert "PATHWAYS_JOB_ROOTS" in st["error"]
    assert not outside.exists() and not (tmp_path / "c").exists()
    assert worker.poll() is None


def test_job_request_validation_names_the_field():
    with pytest.raises(ValueError, match="batch_size 6 is not divisible into micro_batches 4"):
        JobRequest(spec="s.yaml", out="o", batch_size=6, micro_batches=4)
    with pytest.raises(ValueError, match="engine must be one of"):
        JobRequest(spec="s.yaml", out="o", engine="gpu-magic")
    with pytest.raises(ValueError, match="unknown job field"):
        JobRequest.from_dict({"spec": "s.yaml", "out": "o", "stepz": 3})
