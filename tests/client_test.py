"""pathways.client (sync and asyncio) against a real secured deployment (`up`'s processes: mutual
TLS between services, API keys at the gateway): streamed greedy text equals the in-process
pathway, the catalog and chat template come from the checkpoint, errors keep their status."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from pathways import catalog, certs, chat, client, transport
from pathways import generate as gen
from pathways.deploy.local import LocalDeployment
from pathways.sampling import SamplingParams
from pathways.serving import auth
from pathways.serving.testing import make_checkpoint
from pathways.tokenizers import ByteTokenizer

pytestmark = pytest.mark.slow
READER = auth.new_key()  # role generate
TEMPLATE = chat.ChatTemplate({"user": "Q: {content}\n", "assistant": "A: {content}\n"}, "A:", ())


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    home, ckpt = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("ckpt")
    ex = make_checkpoint(ckpt)
    chat.save(ckpt, TEMPLATE)
    auth.KeyStore([auth.hashed("reader", "generate", READER)]).save(home / "api-keys.json")
    saved = os.environ.get("PATHWAYS_HOME")
    os.environ["PATHWAYS_HOME"] = str(home)
    try:
        with LocalDeployment(ckpt, coordinator=False, secure_dir=home) as dep:
            tls = transport.TLSConfig.from_dir(home / "tls" / certs.CLIENT)
            yield dep, ex, ckpt, tls
    finally:
        if saved is None:
            os.environ.pop("PATHWAYS_HOME", None)
        else:
            os.environ["PATHWAYS_HOME"] = saved


def _local(ex, prompt: str, n: int, pathway: str = "tiny") -> str:
    params = SamplingParams(temperature=0.0, max_new_tokens=n)
    return gen.generate(ex, pathway, [prompt], ByteTokenizer(), params)[0].text


def test_sync_stream_is_the_local_greedy_text(deployment):
    dep, ex, _, tls = deployment
    with client.Client(dep.gateway, api_key=READER, tls=tls) as c:
        toks = list(c.generate("def main", max_tokens=12))
        assert "".join(t.text for t in toks) == _local(ex, "def main", 12)
        assert [t.finish_reason for t in toks[:-1]] == [None] * (len(toks) - 1)
        assert toks[-1].finish_reason == "length" and toks[-1].prompt_tokens == len("def main")
        done = c.complete("x = ", max_tokens=5, pathway="tiny-shallow")
        assert done.text == _local(ex, "x = ", 5, "tiny-shallow") and len(done.token_ids) == 5


def test_async_stream_and_catalog(deployment):
    dep, ex, ckpt, tls = deployment

    async def run():
        async with client.AsyncClient(dep.gateway, api_key=READER, tls=tls) as c:
            pieces = [t.text async for t in c.generate("import ", max_tokens=9)]
            cat = await c.catalog()
            return "".join(pieces), cat

    text, cat = asyncio.run(run())
    assert text == _local(ex, "import ", 9)
    want = catalog.entry(ex.spec, "tiny")
    tiny = next(p for p in cat.pathways if p.name == "tiny")
    assert (tiny.parameters, tiny.weight_bytes) == (want["parameters"], want["weight_bytes"])
    assert tiny.parameters > 0 and tiny.max_seq_len == 256 and tiny.tokens_per_s is None
    assert cat.chat_template == TEMPLATE
    # Measurements stored in the checkpoint show up without a restart.
    catalog.write_measured(ckpt, "tiny", {"tokens_per_s": 123.5, "eval_loss": 2.25})
    with client.Client(dep.gateway, api_key=READER, tls=tls) as c:
        tiny = next(p for p in c.pathways() if p.name == "tiny")
    assert (tiny.tokens_per_s, tiny.eval_loss) == (123.5, 2.25)


def test_errors_keep_their_status(deployment):
    dep, _, _, tls = deployment
    with client.Client(dep.gateway, api_key=READER, tls=tls) as c:
        with pytest.raises(client.GatewayError) as e:
            c.complete("x", pathway="nope")
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "nope" in e.value.details
        with pytest.raises(client.GatewayError) as e:
            c.complete("x", temperature=-1.0)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in str(e.value)
        with pytest.raises(client.GatewayError) as e:
            c.complete("x", api_key="pwk_wrong")
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with client.Client(dep.gateway, api_key="", tls=tls) as c:
        with pytest.raises(client.GatewayError) as e:
            c.pathways()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_no_address_means_the_local_deployment_with_its_certificate_and_key(deployment):
    dep, ex, _, _ = deployment
    with client.Client() as c:  # PATHWAYS_HOME's state file: client certificate, admin key
        assert c.address == dep.gateway
        assert c.complete("def ", max_tokens=4).text == _local(ex, "def ", 4)


def test_closing_a_stream_early_cancels_it_and_the_gateway_keeps_serving(deployment):
    dep, ex, _, tls = deployment
    with client.Client(dep.gateway, api_key=READER, tls=tls) as c:
        for _ in range(3):
            it = c.generate("def ", max_tokens=200)
            assert next(it).token_id >= 0
            it.close()
        assert c.complete("def ", max_tokens=6).text == _local(ex, "def ", 6)
