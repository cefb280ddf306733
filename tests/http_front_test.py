"""The OpenAI-compatible HTTP front against a real secured deployment (what `pathways up` runs:
module servers, gateway and HTTP front as processes, mutual TLS, API keys), driven with the
official `openai` package, httpx for what the SDK hides (headers, raw SSE, disconnects), curl
for the README's examples, and prometheus_client's parser for /metrics."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pathways import catalog, certs, chat, client, transport
from pathways import generate as gen
from pathways.deploy import launcher, local
from pathways.deploy.local import LocalDeployment
from pathways.sampling import SamplingParams
from pathways.serving import auth
from pathways.serving.testing import make_checkpoint
from pathways.tokenizers import ByteTokenizer
from pathways.v1 import gateway_pb2, gateway_pb2_grpc, module_pb2, module_pb2_grpc

pytestmark = pytest.mark.slow
READER = auth.new_key()  # role generate
SLOTS = 2  # KV-cache slots per attention server: capacity is reached on purpose
README = Path(__file__).resolve().parents[1] / "README.md"
DASHBOARD = Path(__file__).resolve().parents[1] / "k8s" / "grafana-dashboard.json"


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    home, ckpt = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("ckpt")
    ex = make_checkpoint(ckpt)
    auth.KeyStore([auth.hashed("reader", "generate", READER)]).save(home / "api-keys.json")
    saved = os.environ.get("PATHWAYS_HOME")
    os.environ["PATHWAYS_HOME"] = str(home)  # the state file `pathways generate` reads
    try:
        with LocalDeployment(
            ckpt,
            coordinator=False,
            secure_dir=home,
            http_front=True,
            metrics=True,
            module_args=["--max-slots", str(SLOTS)],
            # Where `up` has its gateway keep the pathway table (the last test restarts it).
            pathways_file=local.pathways_file(ckpt),
        ) as d:
            yield {
                "d": d,
                "ex": ex,
                "home": home,
                "ckpt": ckpt,
                "url": d.http.url,
                "tls": transport.TLSConfig.from_dir(home / "tls" / certs.CLIENT),
            }
    finally:
        if saved is None:
            os.environ.pop("PATHWAYS_HOME", None)
        else:
            os.environ["PATHWAYS_HOME"] = saved


def _oa(dep, key: str = READER) -> openai.OpenAI:
    return openai.OpenAI(base_url=dep["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def _local(ex, prompt: str, n: int, stop=()) -> str:
    params = SamplingParams(temperature=0.0, max_new_tokens=n, stop=tuple(stop))
    return gen.generate(ex, "tiny", [prompt], ByteTokenizer(), params)[0].text


def _post(dep, path: str, body, key: str | None = READER, headers=None) -> httpx.Response:
    headers = {**({"Authorization": f"Bearer {key}"} if key is not None else {}), **(headers or {})}
    return httpx.post(dep["url"] + path, json=body, headers=headers, timeout=120)


def _scrape(url: str) -> dict:
    text = httpx.get(url, timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fams: dict, family: str, sample: str, **labels) -> float:
    return sum(
        s.value
        for s in fams[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_models_list_one_entry_per_pathway_with_the_catalog(dep):
    models = {m.id: m for m in _oa(dep).models.list()}
    assert set(models) == {"tiny", "tiny-shallow"}
    tiny = models["tiny"].model_extra["pathway"]
    assert tiny["modules"] == ["embed", "attn-0", "attn-1", "head"]
    assert tiny["max_context"] == 256 and tiny["tokens_per_s"] is None
    shallow = models["tiny-shallow"].model_extra["pathway"]
    assert 0 < shallow["parameters"] < tiny["parameters"]
    assert tiny["weight_bytes"] == 4 * tiny["parameters"]  # float32
    assert _oa(dep).models.retrieve("tiny-shallow").id == "tiny-shallow"


def test_greedy_completion_equals_the_gateway_the_cli_and_the_local_pathway(dep, capsys):
    from tools.cli.main import main

    prompt, n = "def main():", 12
    r = _oa(dep).completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
    text = r.choices[0].text
    assert text == _local(dep["ex"], prompt, n)
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), n)
    with client.Client(dep["d"].gateway, api_key=READER, tls=dep["tls"]) as c:
        assert c.complete(prompt, max_tokens=n).text == text
    capsys.readouterr()
    argv = ["generate", "--gateway", dep["d"].gateway, "--prompt", prompt]
    assert main([*argv, "--max-tokens", str(n), "--temperature", "0"]) == 0
    assert capsys.readouterr().out == prompt + text + "\n"
    assert main([*argv, "--pathway", "nope"]) == 2  # refused: one error line, nothing echoed
    out, err = capsys.readouterr()
    assert out == "" and "NOT_FOUND" in err and len(err.strip().splitlines()) == 1, (out, err)


def test_streamed_chat_equals_the_whole_chat_through_the_default_template(dep):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    oa = _oa(dep)
    whole = oa.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    chunks = list(
        oa.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason and set(reasons[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    prompt = chat.DEFAULT.render(messages)
    assert whole.usage.prompt_tokens == len(prompt)
    assert streamed == _local(dep["ex"], prompt, 10, chat.DEFAULT.stop)
    # The raw stream is server-sent events ending with [DONE].
    body = {"model": "tiny", "messages": messages, "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST",
        dep["url"] + "/v1/chat/completions",
        json=body,
        timeout=60,
        headers={"Authorization": f"Bearer {READER}"},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_stop_sequences_end_the_text_before_them(dep):
    oa = _oa(dep)
    full = oa.completions.create(model="tiny", prompt="x = ", max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[6:8]  # a piece from the middle of the greedy text
    cut = oa.completions.create(
        model="tiny", prompt="x = ", max_tokens=24, temperature=0, stop=[stop, "\u2603"]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_the_same_seed_gives_the_same_sampled_text(dep):
    oa = _oa(dep)

    def sample(seed):
        kw = dict(model="tiny", prompt="def ", max_tokens=20, temperature=1.0, top_p=0.95)
        return oa.completions.create(seed=seed, **kw).choices[0].text

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b and a != c


def test_embeddings_are_the_gateways_pooled_hidden_states(dep):
    r = _oa(dep).embeddings.create(model="tiny", input=["hello", "def f():"])
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 128
    with client.Client(dep["d"].gateway, api_key=READER, tls=dep["tls"]) as c:
        want = c.embed("def f():", pathway="tiny")
    assert max(abs(a - b) for a, b in zip(r.data[1].embedding, want.vector)) < 1e-6
    assert r.data[0].embedding != r.data[1].embedding
    # Usage counts the texts' tokens (the byte tokenizer: one per byte).
    assert want.prompt_tokens == len("def f():")
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (13, 13)
    one = _oa(dep).embeddings.create(model="tiny", input="h\u00e9", encoding_format="base64")
    assert one.usage.prompt_tokens == 3  # "é" is two UTF-8 bytes


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "logprobs": 3}, "logprobs"),
        ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x", "max_tokens": 300}, "prompt"),  # beyond the 256-token context
        ({"model": "", "prompt": "x"}, "model"),
    ],
)
def test_bad_parameters_get_400_naming_the_field(dep, body, param):
    r = _post(dep, "/v1/completions", {"model": "tiny", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert "Retry-After" not in r.headers


def test_chat_messages_are_checked(dep):
    r = _post(dep, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        _oa(dep).chat.completions.create(model="tiny", messages=[], max_tokens=2)
    assert e.value.body["param"] == "messages"


def test_auth_size_and_model_errors(dep):
    with pytest.raises(openai.AuthenticationError) as e:
        _oa(dep, "pwk_wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
    assert e.value.status_code == 401 and "unknown API key" in e.value.message
    r = _post(dep, "/v1/completions", {"model": "tiny", "prompt": "x"}, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(dep["url"] + "/v1/models", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        _oa(dep).completions.create(model="no-such", prompt="x", max_tokens=2)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    assert (
        httpx.get(
            dep["url"] + "/v1/models/no-such", headers={"Authorization": f"Bearer {READER}"}
        ).status_code
        == 404
    )
    big = {"model": "tiny", "prompt": "x" * (1 << 20)}  # the body limit is 1 MiB
    r = _post(dep, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(
        dep["url"] + "/v1/completions",
        content=b"{nope",
        timeout=30,
        headers={"Authorization": f"Bearer {READER}"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


def _admin_key(dep) -> str:
    return dep["d"].api_key_file.read_text().strip()


def _set_pathway(dep, name: str, modules: list[str]) -> None:
    ch = transport.channel(dep["d"].gateway, tls=dep["tls"])
    try:
        gateway_pb2_grpc.GatewayServiceStub(ch).SetPathway(
            gateway_pb2.SetPathwayRequest(name=name, modules=modules),
            metadata=auth.client_metadata(_admin_key(dep)),
            timeout=30,
        )
    finally:
        ch.close()


def test_403_for_a_key_whose_role_is_not_enough(dep):
    """DELETE /v1/models/{id} (OpenAI's model deletion) is the gateway's RemovePathway, which
    needs an admin key: the reader's generate key gets 403 and the pathway stays; the local
    admin's key removes it (put back afterwards with SetPathway, for the other tests)."""
    with pytest.raises(openai.PermissionDeniedError) as e:
        _oa(dep).models.delete("tiny-shallow")
    assert e.value.status_code == 403 and e.value.body["type"] == "permission_error"
    assert "needs role 'admin'" in e.value.message and "'generate'" in e.value.message
    r = httpx.delete(
        dep["url"] + "/v1/models/tiny", headers={"Authorization": f"Bearer {READER}"}, timeout=30
    )
    assert r.status_code == 403 and "Retry-After" not in r.headers
    assert {m.id for m in _oa(dep).models.list()} == {"tiny", "tiny-shallow"}

    admin = _oa(dep, _admin_key(dep))
    with pytest.raises(openai.NotFoundError) as e:
        admin.models.delete("no-such")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    modules = admin.models.retrieve("tiny-shallow").model_extra["pathway"]["modules"]
    try:
        gone = admin.models.delete("tiny-shallow")
        assert gone.deleted and gone.id == "tiny-shallow"
        assert {m.id for m in _oa(dep).models.list()} == {"tiny"}
        with pytest.raises(openai.NotFoundError):
            _oa(dep).completions.create(model="tiny-shallow", prompt="x", max_tokens=2)
    finally:
        _set_pathway(dep, "tiny-shallow", modules)
    assert {m.id for m in _oa(dep).models.list()} == {"tiny", "tiny-shallow"}


def test_429_with_retry_after_only_when_the_servers_are_at_capacity(dep):
    """Fill attn-0's KV-cache slots with sessions of our own (the deployment's client
    certificate), then ask: 429 and Retry-After; free them: served again. The wait is the
    module server's hint (its trailing retry-after-ms), passed on by the gateway."""
    address = dep["d"].fleet.endpoints["attn-0"][0]
    ch = transport.channel(address, tls=dep["tls"])
    stub = module_pb2_grpc.ModuleServiceStub(ch)
    sids = []
    try:
        for _ in range(SLOTS):
            sids.append(
                stub.OpenSession(module_pb2.OpenSessionRequest(batch_size=1), timeout=10).session_id
            )
        with pytest.raises(grpc.RpcError) as e:
            stub.OpenSession(module_pb2.OpenSessionRequest(batch_size=1), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        hint = transport.retry_after(e.value.trailing_metadata())
        assert hint is not None and hint > 0
        with client.Client(dep["d"].gateway, api_key=READER, tls=dep["tls"]) as c:
            with pytest.raises(client.GatewayError) as ge:
                c.complete("x", pathway="tiny", max_tokens=2)
        assert ge.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ge.value.retry_after_s == hint  # the gateway passed the module's hint on
        r = _post(dep, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 429, r.text
        assert r.headers["Retry-After"] == str(max(1, math.ceil(hint)))
        assert r.headers["retry-after-ms"] == str(round(hint * 1000))
        assert r.json()["error"]["code"] == "servers_at_capacity"
        with pytest.raises(openai.RateLimitError):
            _oa(dep).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
            )
    finally:
        for sid in sids:
            stub.CloseSession(module_pb2.CloseSessionRequest(session_id=sid), timeout=10)
        ch.close()
    r = _post(dep, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_a_client_that_goes_away_cancels_the_generation_and_frees_the_session(dep):
    gw, attn = dep["d"].metrics_urls["gateway"], dep["d"].metrics_urls["attn-0"]
    family = "pathways_gateway_generations"

    def cancelled():
        fams = _scrape(gw)
        return _value(fams, family, family + "_total", code="CANCELLED") if family in fams else 0

    before = cancelled()
    for i in range(SLOTS + 1):  # more streams than slots: each must free its session
        body = {"model": "tiny", "prompt": "def ", "max_tokens": 240, "stream": True}
        with httpx.stream(
            "POST",
            dep["url"] + "/v1/completions",
            json=body,
            timeout=60,
            headers={"Authorization": f"Bearer {READER}"},
        ) as r:
            assert r.status_code == 200
            next(ln for ln in r.iter_lines() if ln.startswith("data: "))
        end = time.monotonic() + 15  # 240 tokens take far longer than this here
        while cancelled() < before + i + 1 and time.monotonic() < end:
            time.sleep(0.2)
        assert cancelled() == before + i + 1
    end = time.monotonic() + 15
    while time.monotonic() < end:
        sessions = _value(
            _scrape(attn),
            "pathways_module_active_sessions",
            "pathways_module_active_sessions",
            module="attn-0",
        )
        if sessions == 0:
            break
        time.sleep(0.2)
    assert sessions == 0


def test_a_stopping_front_lets_its_streams_finish_within_its_grace(dep):
    """SIGTERM to an HTTP front mid-stream: with --grace-s 60 the stream goes on to [DONE] and
    the front exits right after, refusing new connections meanwhile; with --grace-s 0 the stream
    is cut."""
    d = dep["d"]
    fronts = {
        g: launcher.start_http_front(
            d.gateway, tls=d.identities.tls("http-front"), extra_args=["--grace-s", str(g)]
        )
        for g in (60, 0)
    }
    body = {"model": "tiny", "prompt": "def ", "max_tokens": 120, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {READER}"}
    try:
        for front in fronts.values():
            launcher.wait_http_ready(front, 60)
        for grace, front in fronts.items():
            text = []
            with httpx.stream(
                "POST", front.url + "/v1/completions", json=body, timeout=60, headers=headers
            ) as r:
                lines = r.iter_lines()
                text.append(next(ln for ln in lines if ln.startswith("data: ")))
                front.proc.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                with pytest.raises(httpx.ConnectError):
                    httpx.get(front.url + "/healthz", timeout=5)
                with contextlib.suppress(httpx.RemoteProtocolError):  # a cut stream
                    text += [ln for ln in lines if ln.startswith("data: ")]
            t_end = time.monotonic()
            front.proc.wait(30)
            assert time.monotonic() - t_end < 10
            # uvicorn re-raises the signal once it has shut down: the exit status says SIGTERM.
            assert front.proc.returncode in (0, -signal.SIGTERM)
            if grace:
                assert text[-1] == "data: [DONE]"
                chunks = [json.loads(ln[len("data: ") :]) for ln in text[:-1]]
                got = "".join(c["choices"][0]["text"] for c in chunks)
                assert got == _local(dep["ex"], "def ", 120)
            else:
                assert "data: [DONE]" not in text
    finally:
        launcher.stop_all(list(fronts.values()))


def _readme_curls() -> list[str]:
    lines, out, cur = README.read_text().splitlines(), [], None
    for ln in lines:
        s = ln.strip()
        if cur is not None:
            cur += " " + s.rstrip("\\").strip()
            if not s.endswith("\\"):
                out.append(cur)
                cur = None
        elif s.startswith("curl "):
            if s.endswith("\\"):
                cur = s.rstrip("\\").strip()
            else:
                out.append(s)
    return out


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_readme_curl_examples_run(dep):
    curls = _readme_curls()
    assert len(curls) >= 3, curls
    env = {**os.environ, "PATHWAYS_HTTP": dep["url"], "PATHWAYS_API_KEY": READER}
    for cmd in curls:
        p = subprocess.run(
            ["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=120
        )
        assert p.returncode == 0, (cmd, p.stderr)
        out = p.stdout.strip()
        if "stream" in cmd:
            events = [ln for ln in out.splitlines() if ln]
            assert events[-1] == "data: [DONE]", (cmd, out)
            json.loads(events[0][len("data: ") :])
        else:
            data = json.loads(out)
            assert "error" not in data and data.get("object") in (
                "list",
                "text_completion",
                "chat.completion",
            ), (cmd, out)


def test_model_auto_routes_to_the_best_pathway_within_the_bounds(dep):
    """Measurements as `pathways bench-pathways` stores them in the checkpoint (values written
    here): the gateway's catalog carries them, the front routes `model: "auto"` by them."""
    catalog.write_measured(dep["ckpt"], "tiny", {"tokens_per_s": 50.0, "eval_loss": 2.0})
    catalog.write_measured(dep["ckpt"], "tiny-shallow", {"tokens_per_s": 100.0, "eval_loss": 3.0})
    try:
        oa = _oa(dep)
        listed = {m.id: m.model_extra["pathway"] for m in oa.models.list()}
        assert listed["tiny"]["tokens_per_s"] == 50.0 and listed["tiny"]["eval_loss"] == 2.0
        r = oa.completions.create(model="auto", prompt="x", max_tokens=2, temperature=0)
        assert r.model == "tiny"  # the lowest eval loss
        r = oa.completions.create(
            model="auto", prompt="x", max_tokens=2, extra_body={"max_ms_per_token": 15}
        )
        assert r.model == "tiny-shallow"  # tiny takes 20 ms per token
        chat_body = {"model": "auto", "messages": [{"role": "user", "content": "x"}]}
        limit = str(listed["tiny"]["parameters"] - 1)
        r = _post(
            dep,
            "/v1/chat/completions",
            {**chat_body, "max_tokens": 2},
            headers={"X-Pathways-Max-Parameters": limit},
        )
        assert r.status_code == 200 and r.json()["model"] == "tiny-shallow"
        r = _post(dep, "/v1/completions", {"model": "auto", "prompt": "x", "max_ms_per_token": 1})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "max_ms_per_token"
        assert r.json()["error"]["code"] == "no_pathway_meets_constraints"
        r = _post(dep, "/v1/completions", {"model": "tiny", "prompt": "x", "max_parameters": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_parameters"
    finally:
        (dep["ckpt"] / catalog.MEASURED).unlink()


def test_metrics_after_traffic(dep):
    urls = dep["d"].metrics_urls
    _oa(dep).completions.create(model="tiny", prompt="def ", max_tokens=8, temperature=0)
    front = _scrape(urls["http-front"])
    ok = _value(
        front,
        "http_server_request_duration_seconds",
        "http_server_request_duration_seconds_count",
        http_route="/v1/completions",
        http_response_status_code="200",
    )
    assert ok >= 3
    assert (
        _value(
            front,
            "http_server_request_duration_seconds",
            "http_server_request_duration_seconds_count",
            http_response_status_code="429",
        )
        >= 1
    )
    ttft = "pathways_http_time_to_first_token_seconds"
    n, total = _value(front, ttft, ttft + "_count"), _value(front, ttft, ttft + "_sum")
    assert n >= 3 and 0 < total / n < 60
    rate = "pathways_http_tokens_per_second"
    assert 0 < _value(front, rate, rate + "_sum") / _value(front, rate, rate + "_count") < 1e5
    assert (
        _value(
            front,
            "pathways_http_completion_tokens",
            "pathways_http_completion_tokens_total",
            model="tiny",
        )
        >= 8
    )
    assert _value(front, "pathways_http_active_streams", "pathways_http_active_streams") == 0
    gw = _scrape(urls["gateway"])
    assert (
        _value(gw, "pathways_gateway_generations", "pathways_gateway_generations_total", code="OK")
        >= 3
    )
    assert (
        _value(
            gw,
            "pathways_gateway_generations",
            "pathways_gateway_generations_total",
            code="RESOURCE_EXHAUSTED",
        )
        >= 1
    )
    t = "pathways_gateway_time_to_first_token_seconds"
    assert 0 < _value(gw, t, t + "_sum") / _value(gw, t, t + "_count") < 60
    # Per-hop latency as the gateway sees it (the module servers' own is below).
    hop = "pathways_gateway_hop_latency_milliseconds"
    n = _value(gw, hop, hop + "_count", hop="attn-0", method="Decode")
    assert n >= 7 and 0 < _value(gw, hop, hop + "_sum", hop="attn-0", method="Decode") / n < 6e4
    assert _value(gw, hop, hop + "_count", hop="head", method="Prefill") >= 1
    assert _value(gw, hop, hop + "_count", hop="attn-1", method="Forward") >= 1  # embeddings
    assert (
        _value(gw, "pathways_gateway_active_generations", "pathways_gateway_active_generations")
        == 0
    )
    attn = _scrape(urls["attn-0"])
    lat = "pathways_module_latency_milliseconds"
    decodes = _value(attn, lat, lat + "_count", module="attn-0", method="Decode")
    decodes += _value(attn, lat, lat + "_count", module="attn-0", method="DecodeGroup")
    assert decodes >= 7
    assert (
        _value(
            attn,
            "pathways_module_kv_cache_bytes",
            "pathways_module_kv_cache_bytes",
            module="attn-0",
        )
        > 0
    )
    batch = "pathways_module_batch_size"
    assert _value(attn, batch, batch + "_count", module="attn-0") >= 1
    assert _value(attn, batch, batch + "_bucket", module="attn-0", le="+Inf") == _value(
        attn, batch, batch + "_count", module="attn-0"
    )
    head = _scrape(urls["head"])
    assert "pathways_module_active_sessions" in head
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", urls["embed"])
    # Every series the Grafana dashboard queries is one these processes emit.
    emitted = {s.name for fams in (front, gw, attn, head) for f in fams.values() for s in f.samples}
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\b(?:pathways|http_server)_[a-z_]+", e)}
    assert len(queried) >= 10 and queried <= emitted, queried - emitted


def _restart_gateway(dep) -> None:
    """Stops the deployment's gateway and starts it again on the same port, with the flags the
    deployment started it with (its --pathways-file among them); waits until the HTTP front
    reaches it."""
    d = dep["d"]
    old = d.fleet.gateway
    argv = list(old.proc.args[2:])  # after `python -m`
    old.stop()
    new = launcher.Process(
        "gateway", argv, old.port, env=d.identities.tls(certs.GATEWAY).env(), label="gateway"
    )
    d.fleet.gateway = new  # stopped with the deployment
    launcher.wait_all_healthy([new], 120, tls=d.fleet.client_tls)
    end = time.monotonic() + 60
    while httpx.get(dep["url"] + "/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < end, "the HTTP front did not reach the restarted gateway"
        time.sleep(0.2)


def test_a_removed_and_an_added_pathway_survive_a_gateway_restart(dep):
    """DELETE /v1/models/ID and SetPathway are kept in the pathways file `up` gives its gateway,
    in the deployment's state directory: after a restart the removed pathway stays gone and the
    added one is served. (Last in the file: a restart resets the gateway's metrics, which
    test_metrics_after_traffic reads.)"""
    admin = _oa(dep, _admin_key(dep))
    modules = admin.models.retrieve("tiny-shallow").model_extra["pathway"]["modules"]
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    want = gen.generate(dep["ex"], "tiny-shallow", ["def "], ByteTokenizer(), params)[0].text
    try:
        assert admin.models.delete("tiny-shallow").deleted
        _set_pathway(dep, "tiny-copy", modules)
        _restart_gateway(dep)
        assert {m.id for m in _oa(dep).models.list()} == {"tiny", "tiny-copy"}
        with pytest.raises(openai.NotFoundError):
            _oa(dep).completions.create(model="tiny-shallow", prompt="x", max_tokens=2)
        r = _oa(dep).completions.create(
            model="tiny-copy", prompt="def ", max_tokens=4, temperature=0
        )
        assert (r.choices[0].text, r.model) == (want, "tiny-copy")
    finally:
        admin.models.delete("tiny-copy")
        _set_pathway(dep, "tiny-shallow", modules)
    assert {m.id for m in _oa(dep).models.list()} == {"tiny", "tiny-shallow"}
    kept = local.pathways_file(dep["ckpt"])
    assert kept.parent == dep["home"] / "gateway-pathways", kept
    saved = json.loads(kept.read_text())
    assert saved["removed"] == [] and saved["pathways"] == {"tiny-shallow": modules}
