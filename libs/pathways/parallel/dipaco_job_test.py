"""A DiPaCo job's rounds on disk, in-process: routing, per-path averaging, the router it saves,
resume (the same through Celery: tests/dipaco_coordinator_test.py)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from pathways import checkpoint as ckpt
from pathways import tokenizers
from pathways.executor.local import LocalExecutor
from pathways.parallel import diloco, diloco_job, dipaco, routing
from pathways.parallel.diloco_job import load_arrays
from pathways.parallel.dipaco_job import DiPaCoRequest, assignment_path
from pathways.serving import testing

SPEC = """
tokenizer: {kind: byte}
modules:
  embed: {kind: embedding, vocab_size: 257, d_model: 24, max_seq_len: 16}
  lower: {kind: attention, d_model: 24, n_layers: 1, n_heads: 3, max_seq_len: 16}
  upper: {kind: attention, d_model: 24, n_layers: 1, n_heads: 3, max_seq_len: 16}
  head: {kind: decoding, d_model: 24, vocab_size: 257}
pathways:
  p: [embed, lower, upper, head]
"""
# A smaller pathway of other modules, as a router checkpoint of its own.
ROUTER_SPEC = """
tokenizer: {kind: byte}
modules:
  r-embed: {kind: embedding, vocab_size: 257, d_model: 8, max_seq_len: 16}
  r-attn: {kind: attention, d_model: 8, n_layers: 1, n_heads: 2, max_seq_len: 16}
  r-head: {kind: decoding, d_model: 8, vocab_size: 257}
pathways:
  small: [r-embed, r-attn, r-head]
"""
PATHS = ["p.0.0", "p.0.1", "p.1.0", "p.1.1"]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    # Two kinds of documents, so that k-means has something to separate.
    text = "".join(
        f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" if i % 2 else f"# note {i}: a b c {i}\n"
        for i in range(600)
    )
    (tmp_path / "corpus.txt").write_text(text)
    return tmp_path


def request(files, out: str, **kw) -> DiPaCoRequest:
    args = dict(
        spec=str(files / "spec.yaml"),
        out=str(files / out),
        data=(str(files / "corpus.txt"),),
        grid={"lower": 2, "upper": 2},
        inner_steps=2,
        steps=6,
        batch_size=3,
        seq_len=13,
        lr=1e-2,
        doc_len=48,
        router_prefix=12,
        eval_batches=2,
    )
    args.update(kw)
    return DiPaCoRequest(**args)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_h1_sgd_round_moves_each_module_by_the_gradients_of_its_paths_only(files):
    """Inner SGD, H=1, outer plain averaging (lr 1, no momentum): a module's new parameters are
    its old ones minus lr x the mean gradient of the paths that use it, each on a batch of its
    own routed documents."""
    lr = 0.1
    req = request(
        files,
        "h1",
        inner_steps=1,
        steps=1,
        inner="sgd",
        clip=0.0,
        lr=lr,
        outer_lr=1.0,
        outer_momentum=0.0,
    )
    (rec,) = diloco_job.run_in_process(req)
    assert rec["averaged"]["embed"] == rec["averaged"]["head"] == PATHS
    assert rec["averaged"]["lower.0"] == ["p.0.0", "p.0.1"]
    assert rec["averaged"]["upper.1"] == ["p.0.1", "p.1.1"]

    run = req.build_run()
    assert run.start() == 1
    ctx = run.ctx
    assert ctx.pathways == PATHS
    # Every copy of a chosen module starts as the base module (initial parameters, seed 0).
    base = LocalExecutor(ctx.base, seed=req.seed)
    for copy, origin in (("lower.0", "lower"), ("lower.1", "lower"), ("upper.1", "upper")):
        for a, b in zip(leaves(ctx.like[copy]), leaves(base.state(origin))):
            np.testing.assert_array_equal(a, b)
    ref = LocalExecutor(ctx.spec, dict(ctx.like))
    grads = {}
    for k, p in enumerate(PATHS):
        x, y = diloco.shard_batch(ctx.tokens(k), k, 0, req.batch_size, req.seq_len, req.seed)
        grads[p] = ref.loss_and_grads(p, x, y)[1]
    got = run.params()
    for m, using in dipaco.users(ctx.spec, PATHS).items():
        want = jax.tree.map(
            lambda s, *g: s - lr * sum(g) / len(g), ctx.like[m], *[grads[p][m] for p in using]
        )
        for a, b in zip(leaves(got[m]), leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The copies started equal; each moved by its own paths only, so they now differ.
    diff = max(np.abs(a - b).max() for a, b in zip(leaves(got["lower.0"]), leaves(got["lower.1"])))
    assert diff > 1e-6


def test_routing_is_balanced_deterministic_and_saved_with_the_checkpoint(files):
    req = request(files, "r", steps=2)
    diloco_job.run_in_process(req, rounds=0)  # the router is fitted and saved before round 0
    out = files / "r"
    assignment = load_arrays(assignment_path(out))[0]
    docs = dipaco.documents(diloco_job.context(req).data.train, req.doc_len)
    assert len(assignment) == len(docs)
    counts = np.bincount(assignment, minlength=4)
    assert counts.max() - counts.min() <= 1 and counts.sum() == len(docs)

    # Fitted again from scratch (another process would do this): the same centroids and paths.
    diloco_job._CONTEXTS.clear()
    router, again = request(files, "r2", steps=2).build_context().fit_router()
    np.testing.assert_array_equal(again, assignment)

    saved = routing.load(out, ckpt.load_spec(out)[0])
    assert saved.family == "p" and saved.paths == PATHS
    np.testing.assert_allclose(saved.kmeans.centroids, router.kmeans.centroids, rtol=1e-6)
    np.testing.assert_array_equal(saved.route(docs), router.route(docs))
    assert set(ckpt.load_spec(out / "router")[0].modules) == {"embed", "lower", "upper", "head"}
    tok = tokenizers.ByteTokenizer()
    prompts = ["def f3(x):", "# note 8: a b", "", "x" * 200]
    chosen = [saved.path_of(tok, t) for t in prompts]
    assert chosen == [saved.path_of(tok, t) for t in prompts]  # deterministic
    assert all(c in PATHS for c in chosen)
    # A prompt is routed on its first router_prefix tokens, as documents are.
    assert saved.path_of(tok, "x" * 12) == saved.path_of(tok, "x" * 200)
    ids = tok.encode(prompts[0])
    padded = saved.features.of_ids(ids)
    exact = dipaco.features(saved.features.executor, "p", np.asarray([ids], np.int32), 12)
    np.testing.assert_allclose(padded, exact, rtol=1e-5, atol=1e-6)


def test_resumed_job_equals_an_uninterrupted_one(files):
    # 2 paths (the upper module's choices), AdamW inner and Nesterov outer steps: every piece of
    # state crosses the interruption.
    kw = dict(grid={"upper": 2}, steps=4)
    full = diloco_job.run_in_process(request(files, "full", **kw))
    assert [r["round"] for r in full] == [1, 2]
    assert full[-1]["eval_loss"] < full[0]["eval_loss"]

    part = request(files, "part", **kw)
    assert len(diloco_job.run_in_process(part, rounds=1)) == 1
    assert sorted(p.name for p in (files / "part" / "dipaco").iterdir()) == [
        "assignment.npz",
        "round-000001",
    ]
    diloco_job._CONTEXTS.clear()  # a fresh process reads the assignment back
    assert [r["round"] for r in diloco_job.run_in_process(part)] == [2]
    for ra, rb in zip(metrics(files / "full"), metrics(files / "part")):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
        assert rb["eval_loss"] == pytest.approx(ra["eval_loss"], rel=1e-6)
    a, b = request(files, "full", **kw).build_run(), part.build_run()
    assert a.start() == b.start() == 2
    pa, pb = a.params(), b.params()
    for m in pa:
        for x, y in zip(leaves(pa[m]), leaves(pb[m])):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    grid_modules = {"embed", "lower", "upper.0", "upper.1", "head"}
    assert {p.name for p in (files / "part" / "modules").iterdir()} == grid_modules
    with pytest.raises(ValueError, match=r"with grid \{'upper': 2\}, not \{'lower': 2\}"):
        request(files, "part", grid={"lower": 2}, steps=4).build_run().start()


def test_router_from_a_checkpoint_of_its_own(files):
    (files / "small.yaml").write_text(ROUTER_SPEC)
    testing.make_checkpoint(files / "router-ckpt", files / "small.yaml", seed=3)
    req = request(files, "rc", steps=2, router_checkpoint=str(files / "router-ckpt"))
    diloco_job.run_in_process(req, rounds=0)
    saved = routing.load(files / "rc")
    assert saved.features.pathway == "small"
    assert set(saved.features.executor.spec.modules) == {"r-embed", "r-attn", "r-head"}
    for m in ("r-embed", "r-attn"):  # the router's weights, as trained (here: as saved)
        want = ckpt.load_module(files / "router-ckpt", m, saved.features.executor.state(m))
        for a, b in zip(leaves(saved.features.executor.state(m)), leaves(want)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="router_checkpoint .* no weights for module"):
        missing = files / "half"
        testing.make_checkpoint(missing, files / "small.yaml")
        ckpt.module_dir(missing, "r-attn").rename(missing / "gone")
        diloco_job._CONTEXTS.clear()
        request(files, "x", router_checkpoint=str(missing)).build_context()


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"grid": {}}, "grid must map at least one module to its number of choices"),
        ({"grid": {"lower": 0}}, r"grid\['lower'\] must be an integer >= 1, got 0"),
        ({"workers": 3}, r"workers \(3\) must be the grid's number of paths \(4\)"),
        ({"router_prefix": 64}, r"router_prefix \(64\) must be <= doc_len \(48\)"),
        ({"doc_len": 0}, "doc_len must be a positive integer, got 0"),
        ({"steps": 5}, r"steps \(5\) must be a positive multiple of inner_steps \(2\)"),
    ],
)
def test_request_errors_name_the_value(files, kw, words):
    with pytest.raises(ValueError, match=words):
        request(files, "x", **kw)


def test_bad_grid_and_unknown_fields_are_named(files):
    with pytest.raises(ValueError, match="unknown DiPaCo job field"):
        DiPaCoRequest.from_dict({"spec": "s", "out": "o", "grid": {"a": 2}, "gird": 1})
    with pytest.raises(ValueError, match="choices name 'middle'"):
        request(files, "x", grid={"middle": 2}).build_context()
    with pytest.raises(ValueError, match="router_prefix must be in \\[1, 16\\]"):
        request(files, "x", doc_len=40, router_prefix=20).build_context()
    # About 17,000 training tokens make fewer documents of 6,000 than there are paths.
    with pytest.raises(ValueError, match="cannot be routed to 4 paths: give more data"):
        request(files, "few", doc_len=6000, router_prefix=12).build_run().start()
