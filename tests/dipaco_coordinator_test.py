"""DiPaCo jobs on the real coordinator, then served by a routing gateway.

An embedded broker and one real worker (a task per path); examples/tiny.yaml with 2 choices of
each attention module = 4 paths. With inner SGD, H=1 and plain-averaging outer SGD (lr 1, no
momentum) each module moves by the mean gradient of the paths that use it, on their own routed
documents; a job cancelled after a round and resubmitted equals the uninterrupted one. The job's
checkpoint then runs on real module servers (one per module) behind a gateway that routes each
prompt to one path: the tokens are that path's, and no other path's module is called.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import httpx
import jax
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pathways import chat, codec, transport
from pathways import checkpoint as ckpt
from pathways import client as gw_client
from pathways import generate as gen
from pathways.coordinator.testing import (
    cancel_and_resubmit,
    coordinator,
    metrics,
)
from pathways.deploy import launcher
from pathways.executor.local import LocalExecutor
from pathways.parallel import diloco, dipaco, routing
from pathways.parallel.diloco_job import load_arrays
from pathways.parallel.dipaco_job import DiPaCoRequest, assignment_path
from pathways.v1 import gateway_pb2, gateway_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")
PATHS = ["tiny.0.0", "tiny.0.1", "tiny.1.0", "tiny.1.1"]
LR, ROUNDS = 0.05, 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """An embedded broker and one worker with a pool process per path, and one for the job."""
    with coordinator(tmp_path_factory.mktemp("broker"), concurrency=len(PATHS) + 1) as c:
        yield c


def job(out: Path, **kw) -> DiPaCoRequest:
    args = dict(
        spec=TINY,
        out=str(out),
        grid={"attn-0": 2, "attn-1": 2},
        steps=ROUNDS,
        inner_steps=1,
        inner="sgd",
        lr=LR,
        clip=0.0,
        outer_lr=1.0,
        outer_momentum=0.0,
        batch_size=4,
        seq_len=32,
        max_data_mb=0.3,
        doc_len=256,
        router_prefix=32,
        eval_every=ROUNDS,
        eval_batches=2,
    )
    args.update(kw)
    return DiPaCoRequest(**args)


def final_params(req: DiPaCoRequest) -> dict:
    run = req.build_run()
    assert run.start() == req.rounds
    return run.params()


@pytest.fixture(scope="module")
def trained(client, tmp_path_factory):
    """The H=1 plain-averaging job, run once through the coordinator."""
    req = job(tmp_path_factory.mktemp("dipaco") / "h1")
    seen = []
    st = client.follow(client.submit(req), timeout=300, on_progress=seen.append)
    assert st["state"] == "SUCCESS", st
    return req, seen


def test_each_module_moves_by_the_gradients_of_its_paths_only(trained):
    req, seen = trained
    out = Path(req.out)
    progress = [s for s in seen if s["state"] == "PROGRESS"]
    # Each path in a process of its own, the job in another.
    assert progress and all(len(set(s["worker_pids"]) | {s["pid"]}) == 5 for s in progress)
    rec = metrics(out)[-1]
    assert rec["averaged"]["embed"] == rec["averaged"]["head"] == PATHS
    assert rec["averaged"]["attn-0.1"] == ["tiny.1.0", "tiny.1.1"]
    assert rec["averaged"]["attn-1.0"] == ["tiny.0.0", "tiny.1.0"]

    # Routing is deterministic: fitted again here, the documents go to the same paths.
    ctx = req.build_context()
    _, assignment = ctx.fit_router()
    np.testing.assert_array_equal(assignment, load_arrays(assignment_path(out))[0])
    ctx._assignment = assignment

    # The reference: every copy starts as its base module; each step, each path's gradient on a
    # batch of its own documents, and each module the mean over the paths that use it.
    ref = LocalExecutor(ctx.spec, dict(ctx.like))
    used_by = dipaco.users(ctx.spec, PATHS)
    losses = []
    for t in range(ROUNDS):
        outs = {
            p: ref.loss_and_grads(p, *diloco.shard_batch(ctx.tokens(k), k, t, 4, 32, 0))
            for k, p in enumerate(PATHS)
        }
        losses.append(float(np.mean([float(loss) for loss, _ in outs.values()])))
        for m, using in used_by.items():
            mean = jax.tree.map(lambda *g: sum(g) / len(g), *[outs[p][1][m] for p in using])
            ref.set_state(m, jax.tree.map(lambda w, g: w - LR * g, ref.state(m), mean))
    assert [r["loss"] for r in metrics(out)] == pytest.approx(losses, rel=1e-5)
    got = final_params(req)
    for m in used_by:
        for a, b in zip(jax.tree.leaves(got[m]), jax.tree.leaves(ref.state(m))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]  # it did train


def test_a_cancelled_job_resumes_to_the_uninterrupted_result(client, trained, tmp_path):
    ref, _ = trained
    req = job(tmp_path / "cut")
    cancel_and_resubmit(client, req)
    a, b = metrics(Path(ref.out)), metrics(Path(req.out))
    assert [r["round"] for r in b] == list(range(1, ROUNDS + 1))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)
    assert b[-1]["eval_loss"] == pytest.approx(a[-1]["eval_loss"], rel=1e-6)
    pa, pb = final_params(ref), final_params(req)
    for m in pa:
        for x, y in zip(jax.tree.leaves(pa[m]), jax.tree.leaves(pb[m])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_cli_submits_a_dipaco_job_and_follows_it(client, tmp_path, capsys):
    from tools.cli.main import main

    out = tmp_path / "cli"
    argv = ["train", "--spec", TINY, "--out", str(out), "--max-data-mb", "0.3"]
    argv += ["--batch-size", "4", "--seq-len", "32", "--steps", "2", "--eval-every", "1"]
    argv += ["--parallel", "dipaco", "--grid", "attn-1=2", "--inner-steps", "1"]
    argv += ["--doc-len", "256", "--router-prefix", "16", "--broker", client.app.conf.broker_url]
    assert main(argv) == 0, capsys.readouterr().err
    stdout, stderr = capsys.readouterr()
    assert "DiPaCo job" in stderr and "2 paths x 2 rounds of 1 inner steps" in stderr
    assert "MB exchanged; checkpoint" in stdout
    assert [r["averaged"]["attn-1.1"] for r in metrics(out)] == [["tiny.1"], ["tiny.1"]]
    modules = {"embed", "attn-0", "attn-1.0", "attn-1.1", "head"}
    assert {p.name for p in (out / "modules").iterdir()} == modules


# ---- serving the job's checkpoint ---------------------------------------------------------------
@pytest.fixture(scope="module")
def served(trained):
    req, _ = trained
    spec, tok = ckpt.load_spec(req.out)
    local = LocalExecutor(spec)
    for m in spec.modules:
        local.set_state(m, ckpt.load_module(req.out, m, local.state(m)))
    with launcher.Fleet(req.out, list(spec.modules), metrics=True) as fleet:
        yield fleet, spec, tok, local, routing.load(req.out, spec)


def module_calls(fleet) -> dict[str, float]:
    """RPCs each module server has answered (every method), from its /metrics."""
    family = "pathways_module_latency_milliseconds"
    out = {}
    for m in fleet.modules:
        text = httpx.get(fleet.metrics_urls[m], timeout=10).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        samples = fams[family].samples if family in fams else []
        out[m] = sum(s.value for s in samples if s.name == family + "_count")
    return out


PROMPTS = [
    "def main():",
    "import os\nimport sys\n",
    "The quick brown fox",
    "    return self._cache[key]",
    "# Copyright 2001 Python Software Foundation",
    "class Error(Exception):\n    pass",
    "12345 67890",
    '"""Docstring of a module."""',
    "for i in range(10):",
    "   ",
]


def test_the_gateway_serves_a_routed_prompt_through_its_path_only(served, capsys):
    fleet, spec, tok, local, router = served
    n = 6
    by_path = {}
    for p in PROMPTS:
        by_path.setdefault(router.path_of(tok, p), p)
    assert len(by_path) >= 2, by_path  # the router tells these prompts apart
    stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(fleet.gateway.address))
    sampling = gateway_pb2.SamplingOptions(temperature=0, max_new_tokens=n)
    for path, prompt in by_path.items():
        modules = set(spec.pathway(path).modules)
        before = module_calls(fleet)
        for asked in ("", "tiny"):  # no pathway, or the paths' family: routed
            req = gateway_pb2.GenerateRequest(pathway=asked, prompt=prompt, sampling=sampling)
            resps = list(stub.Generate(req, timeout=120))
            assert {(r.pathway, r.routed) for r in resps} == {(path, True)}
            ids = [r.token_id for r in resps if r.token_id >= 0]
            np.testing.assert_array_equal(ids, gen.greedy_ids(local, path, tok.encode(prompt), n))
        deadline = time.monotonic() + 15
        while True:
            after = module_calls(fleet)
            ran = {m for m in after if after[m] > before[m]}
            if ran >= modules or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert ran == modules, (path, before, after)

    # A path named is served as any pathway, not routed.
    req = gateway_pb2.GenerateRequest(pathway="tiny.1.1", prompt="x", sampling=sampling)
    assert {(r.pathway, r.routed) for r in stub.Generate(req, timeout=120)} == {("tiny.1.1", False)}

    from tools.cli.main import main

    path, prompt = next(iter(by_path.items()))
    capsys.readouterr()
    argv = ["generate", "--prompt", prompt, "--max-tokens", str(n), "--temperature", "0"]
    assert main([*argv, "--gateway", fleet.gateway.address]) == 0
    via_gateway = capsys.readouterr()
    assert f"[routed to path {path}]" in via_gateway.err
    assert main([*argv, "--checkpoint", fleet.checkpoint]) == 0
    in_process = capsys.readouterr()
    assert f"[routed to path {path}]" in in_process.err
    assert in_process.out == via_gateway.out and via_gateway.out.startswith(prompt)


def test_the_family_is_listed_and_infer_the_client_and_the_http_front_show_the_path(served, capsys):
    """ListPathways lists the family a request names to be routed, with its paths; an Infer with
    text is routed as Generate is (a tensor naming the family is refused, naming the field);
    pathways.client and the HTTP front (OpenAI's package) say which path served: the response's
    `model` and the X-Pathways-Pathway / X-Pathways-Routed headers."""
    fleet, spec, tok, local, router = served
    address, plain = fleet.gateway.address, transport.TLSConfig.plaintext()
    prompt = PROMPTS[0]
    path = router.path_of(tok, prompt)
    with gw_client.Client(address, api_key="", tls=plain) as c:
        cat = c.pathways()
        assert (cat[0].name, cat[0].paths, cat[0].modules) == ("tiny", PATHS, [])
        assert cat[0].parameters == max(p.parameters for p in cat[1:])
        assert {p.name: (p.family, p.paths) for p in cat[1:]} == {p: ("tiny", []) for p in PATHS}
        done = c.complete(prompt, max_tokens=4)
        assert (done.pathway, done.routed) == (path, True)
        ids = tok.encode(prompt)
        want = np.asarray(local.forward(path, np.asarray([ids], np.int32), head=False))
        for asked in ("", "tiny"):
            e = c.embed(prompt, pathway=asked)
            assert (e.pathway, e.routed) == (path, True)
            np.testing.assert_allclose(e.vector, want.mean(axis=1)[0], rtol=1e-4, atol=1e-5)
        named = c.embed(prompt, pathway="tiny.1.1")
        assert (named.pathway, named.routed) == ("tiny.1.1", False)
        tensor = gateway_pb2.InferRequest(
            pathway="tiny",
            tensor=codec.encode(np.asarray([ids], np.int32)),
            output=gateway_pb2.InferRequest.OUTPUT_EMBEDDING,
        )
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Infer(tensor, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("pathway: 'tiny' is a routed family of paths")

    from tools.cli.main import main

    capsys.readouterr()
    assert main(["pathways", "list", "--gateway", address]) == 0
    assert f"tiny                 routed to one of {', '.join(PATHS)}\n" in capsys.readouterr().out

    front = launcher.start_http_front(address)
    try:
        launcher.wait_http_ready(front, 60)
        oa = openai.OpenAI(base_url=front.url + "/v1", api_key="none", max_retries=0, timeout=120)
        models = {m.id: m.model_extra["pathway"] for m in oa.models.list()}
        assert models["tiny"]["paths"] == PATHS and models["tiny"]["modules"] == []
        assert models["tiny.0.1"]["family"] == "tiny" and models["tiny.0.1"]["paths"] is None
        raw = oa.completions.with_raw_response.create(
            model="tiny", prompt=prompt, max_tokens=4, temperature=0
        )
        assert (raw.headers["x-pathways-pathway"], raw.headers["x-pathways-routed"]) == (
            path,
            "true",
        )
        r = raw.parse()
        assert (r.model, r.choices[0].text) == (path, done.text)
        messages = [{"role": "user", "content": "hi"}]
        chat_path = router.path_of(tok, chat.DEFAULT.render(messages))
        chunks = list(
            oa.chat.completions.create(model="tiny", messages=messages, max_tokens=3, stream=True)
        )
        assert {ch.model for ch in chunks} == {chat_path}
        emb = oa.embeddings.create(model="tiny", input=[prompt])
        assert emb.model == path and emb.data[0].model_extra["pathway"] == path
        raw = oa.completions.with_raw_response.create(model="tiny.1.1", prompt="x", max_tokens=2)
        assert raw.parse().model == "tiny.1.1" and raw.headers["x-pathways-routed"] == "false"
    finally:
        front.stop()
