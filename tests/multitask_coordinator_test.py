"""Multi-task coordinator jobs (issue 19): examples/multitask.yaml's text and digits pathways
trained in turn through their shared attention modules as one Celery job, against a real
Redis-protocol broker and a real worker process, in the worker's own stages and through real
module servers (whose TrainingService takes each call's attention mask): both give the same
losses per task and round (relative 1e-5: text causal, digits bidirectional through the same
modules, digits' updates of them at half its learning rate), the text loss falls, and the checkpoint holds every module once. (That every task
learns through the shared modules over more steps: tests/multitask_test.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pathways.coordinator import worker
from pathways.coordinator.app import make_app
from pathways.coordinator.broker import EmbeddedBroker
from pathways.coordinator.client import JobClient
from pathways.coordinator.multitask_jobs import MultiTaskRequest
from pathways.pipeline import service as training
from pathways.serving.server import ModuleServer
from pathways.serving.settings import ModuleServerSettings
from pathways.serving.testing import make_checkpoint

pytestmark = pytest.mark.slow
SPEC = Path(__file__).resolve().parents[1] / "examples/multitask.yaml"
MODULES = ("text-embed", "patches", "shared-0", "shared-1", "text-head", "digit-classes")
ROUNDS = 8


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    with EmbeddedBroker(workdir=tmp_path_factory.mktemp("broker")) as broker:
        proc = worker.spawn(broker.url)
        try:
            yield JobClient(make_app(broker.url))
        finally:
            worker.stop(proc)


def job(tmp_path: Path, out: str, **kw) -> MultiTaskRequest:
    text = tmp_path / "text.txt"
    if not text.exists():
        text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return MultiTaskRequest(
        spec=str(SPEC),
        out=str(tmp_path / out),
        tasks=[
            {"pathway": "text", "batch_size": 8, "seq_len": 32},
            # Digits moves the shared modules at half its learning rate (a mixing weight:
            # ApplyRequest.lr_scale through the services).
            {
                "pathway": "digits",
                "dataset": "digits",
                "batch_size": 8,
                "lr_scale": {"shared-0": 0.5, "shared-1": 0.5},
            },
        ],
        data=[str(text)],
        steps=ROUNDS,
        lr=3e-3,
        warmup=1,
        eval_every=4,
        eval_batches=2,
        save_every=4,
        micro_batches=2,
        **kw,
    )


def task_losses(out: str) -> dict[str, list[float]]:
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {p: [r["task_losses"][p] for r in recs] for p in ("text", "digits")}


def test_requests_are_checked():
    with pytest.raises(ValueError, match=r"tasks\[1\]: dataset must be one of digits, speech"):
        MultiTaskRequest(
            spec="s", out="o", tasks=[{"pathway": "a"}, {"pathway": "b", "dataset": "x"}]
        )
    with pytest.raises(ValueError, match=r"tasks\[0\].lr_scale must map module names to factors"):
        MultiTaskRequest(spec="s", out="o", tasks=[{"pathway": "a", "lr_scale": {"m": 0}}])
    with pytest.raises(ValueError, match="each pathway may be one task only"):
        MultiTaskRequest(spec="s", out="o", tasks=[{"pathway": "a"}, {"pathway": "a"}])
    with pytest.raises(ValueError, match="needs the module service addresses"):
        MultiTaskRequest(spec="s", out="o", tasks=[{"pathway": "a"}], engine="services")


def test_multitask_job_locally_and_through_the_module_services(coordinator, tmp_path):
    local = job(tmp_path, "local")
    st = coordinator.follow(coordinator.submit(local), timeout=600)
    assert st["state"] == "SUCCESS", st
    assert st["step"] == ROUNDS and set(st["task_losses"]) == {"text", "digits"}
    got = task_losses(local.out)
    assert np.mean(got["text"][-3:]) < got["text"][0] - 0.5, got["text"]
    ckpt = Path(local.out)
    meta = json.loads((ckpt / "train" / "meta.json").read_text())
    assert meta["step"] == ROUNDS and [t["pathway"] for t in meta["tasks"]] == ["text", "digits"]
    assert (ckpt / "loss.png").exists()

    make_checkpoint(tmp_path / "init", SPEC)  # seed 0: the local job's initial weights
    servers = []
    try:
        for m in MODULES:
            s = ModuleServer(
                ModuleServerSettings(str(tmp_path / "init"), m, insecure=True),
                add_ons=[training.ADD_ON],
            )
            s.start()
            servers.append(s)
        remote = job(
            tmp_path,
            "services",
            engine="services",
            modules={m: f"127.0.0.1:{s.port}" for m, s in zip(MODULES, servers)},
        )
        st = coordinator.follow(coordinator.submit(remote), timeout=600)
    finally:
        for s in servers:
            s.stop(0)
    assert st["state"] == "SUCCESS", st
    through = task_losses(remote.out)
    for p in got:  # digits is bidirectional, text causal: each call carried its mask
        np.testing.assert_allclose(through[p], got[p], rtol=1e-5)
    # One checkpoint per module, shared by both pathways, saved by the servers.
    from pathways import checkpoint as ckpt_lib

    assert all(ckpt_lib.has_module(remote.out, m) for m in MODULES)
