"""A DiLoCo job's rounds on disk, in-process: a resumed job equals an uninterrupted one."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from pathways import checkpoint as ckpt
from pathways.parallel import diloco_job
from pathways.parallel.diloco_job import DiLoCoRequest

SPEC = """
tokenizer: {kind: byte}
modules:
  embed: {kind: embedding, vocab_size: 257, d_model: 24, max_seq_len: 16}
  attn: {kind: attention, d_model: 24, n_layers: 1, n_heads: 3, max_seq_len: 16}
  head: {kind: decoding, d_model: 24, vocab_size: 257}
pathways:
  p: [embed, attn, head]
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))
    (tmp_path / "corpus.txt").write_text(text)
    return tmp_path


def request(files, out: str, **kw) -> DiLoCoRequest:
    args = dict(
        spec=str(files / "spec.yaml"),
        out=str(files / out),
        data=(str(files / "corpus.txt"),),
        workers=2,
        inner_steps=2,
        steps=8,
        batch_size=3,
        seq_len=13,
        lr=1e-2,
        eval_batches=2,
        save_every=2,
    )
    args.update(kw)
    return DiLoCoRequest(**args)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resumed_job_equals_an_uninterrupted_one(files):
    full = diloco_job.run_in_process(request(files, "full", compress="bfloat16"))
    assert [r["round"] for r in full] == [1, 2, 3, 4]
    assert full[-1]["eval_loss"] < full[0]["eval_loss"]

    part = request(files, "part", compress="bfloat16")
    assert len(diloco_job.run_in_process(part, rounds=3)) == 3
    meta = ckpt.read_meta(files / "part")
    assert meta["round"] == 3 and meta["positions"] == [6, 6]
    assert sorted(p.name for p in (files / "part" / "diloco").iterdir()) == ["round-000003"]
    with (files / "part" / "metrics.jsonl").open("a") as f:  # a round that never committed
        f.write(json.dumps({"round": 4, "step": 8, "loss": 0.0}) + "\n")
    rest = diloco_job.run_in_process(part)
    assert [r["round"] for r in rest] == [4]

    a, b = metrics(files / "full"), metrics(files / "part")
    assert [r["round"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
        assert rb["eval_loss"] == pytest.approx(ra["eval_loss"], rel=1e-6)
    run_a = diloco_job.DiLoCoRun(request(files, "full", compress="bfloat16"))
    run_b = diloco_job.DiLoCoRun(part)
    assert run_a.start() == run_b.start() == 4
    pa, pb = run_a.params(), run_b.params()
    for n in pa:
        for x, y in zip(jax.tree.leaves(pa[n]), jax.tree.leaves(pb[n])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    assert {p.name for p in (files / "part" / "modules").iterdir()} == {"embed", "attn", "head"}


def test_a_worker_lost_in_a_round_rejoins_with_its_inner_state_of_that_rounds_start(files):
    req = request(files, "lost")
    run = req.build_run()
    run.start()
    ok = [diloco_job.worker_round(req, 0, k, run.positions[k]) for k in range(2)]
    run.finish_round(ok, 1.0)
    kept = {
        f.name: diloco_job.load_arrays(f)
        for f in (files / "lost/diloco/round-000001/inner/worker-1").iterdir()
    }
    # Round 1: worker 1 trains and writes its round-2 state, but is lost (late past the deadline).
    results = [diloco_job.worker_round(req, 1, k, run.positions[k]) for k in range(2)]
    rec = run.finish_round([results[0], {"worker": 1, "round": 1, "lost": True}], 1.0)
    assert rec["workers_lost"] == [1] and run.positions == [4, 2]
    carried = files / "lost/diloco/round-000002/inner/worker-1"
    assert sorted(f.name for f in carried.iterdir()) == sorted(kept)
    for name, first in kept.items():  # its state of round 1's start, not what it wrote after
        for x, y in zip(diloco_job.load_arrays(carried / name), first, strict=True):
            np.testing.assert_array_equal(x, y)
    back = diloco_job.worker_round(req, 2, 1, run.positions[1])
    assert not back["fresh_inner"] and back["position"] == 4


def test_bytes_per_worker_count_the_download_and_the_upload(files):
    rec = diloco_job.run_in_process(request(files, "b", steps=2))[0]
    run = diloco_job.DiLoCoRun(request(files, "b", steps=2))
    run.start()
    n = sum(np.asarray(x).nbytes for p in run.params().values() for x in jax.tree.leaves(p))
    assert rec["bytes_per_worker"] == 2 * n  # float32 down, float32 up
    half = diloco_job.run_in_process(request(files, "h", steps=2, compress="bfloat16"))[0]
    assert half["bytes_per_worker"] == 1.5 * n  # float32 down, bfloat16 up


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"steps": 7}, r"steps \(7\) must be a positive multiple of inner_steps \(2\)"),
        ({"workers": -1}, "workers must be a positive integer, got -1"),
        ({"inner": "adamw", "clip": 0.0}, "clip must be > 0, got 0.0"),
        ({"eval_every": 0}, "eval_every must be a positive integer, got 0"),
        ({"round_timeout": 0}, "round_timeout must be a positive number, got 0"),
        ({"round_deadline": -1}, "round_deadline must be >= 0 seconds; got -1"),
    ],
)
def test_request_errors_name_the_value(files, kw, words):
    with pytest.raises(ValueError, match=words):
        request(files, "x", **kw)
    with pytest.raises(ValueError, match="unknown DiLoCo job field"):
        DiLoCoRequest.from_dict({"spec": "s", "out": "o", "stepz": 1})


def test_a_run_of_another_shape_is_not_resumed(files):
    diloco_job.run_in_process(request(files, "o", steps=2))
    with pytest.raises(ValueError, match="with 2 workers, not 'p' with 3"):
        diloco_job.DiLoCoRun(request(files, "o", steps=2, workers=3)).start()
