"""A module kind from outside the library (tests/plugins/scale_kind.py, named in the spec's
`plugins:`) runs in a pathway in one process and through real module servers and a gateway,
which import it from the spec they load: no library file knows the kind."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from pathways import checkpoint as ckpt
from pathways import generate as gen
from pathways import spec as spec_lib
from pathways.deploy import launcher
from pathways.executor.local import LocalExecutor
from pathways.executor.remote import RemoteExecutor
from pathways.modules import registry
from pathways.sampling import SamplingParams
from pathways.tokenizers import ByteTokenizer
from pathways.v1 import gateway_pb2, gateway_pb2_grpc

PLUGIN = "tests.plugins.scale_kind"
D = 24  # small and not a power of two
SPEC = {
    "plugins": [PLUGIN],
    "tokenizer": {"kind": "byte"},
    "modules": {
        "embed": {"kind": "embedding", "vocab_size": 257, "d_model": D, "max_seq_len": 64},
        "scale": {"kind": "scale", "d_model": D},
        "attn": {"kind": "attention", "d_model": D, "n_layers": 1, "n_heads": 2, "max_seq_len": 64},
        "head": {"kind": "decoding", "d_model": D, "vocab_size": 257},
    },
    "pathways": {"scaled": ["embed", "scale", "attn", "head"], "plain": ["embed", "attn", "head"]},
}
PROMPT = "def main():"
N = 12


def test_the_spec_imports_its_plugins_and_keeps_them():
    spec = spec_lib.from_dict(SPEC)
    kind = registry.get("scale")
    assert type(spec.modules["scale"]) is kind.config and kind.module.__module__ == PLUGIN
    assert not kind.has_cache and not kind.is_head
    assert spec.plugins == (PLUGIN,)
    assert spec_lib.from_dict(spec.to_dict()).to_dict() == spec.to_dict()
    assert spec.with_pathway("short", ["embed", "scale", "head"]).plugins == (PLUGIN,)


def test_a_checkpoint_keeps_the_plugins(tmp_path):
    ckpt.save_spec(tmp_path, spec_lib.from_dict(SPEC), ByteTokenizer())
    assert ckpt.load_spec(tmp_path)[0].plugins == (PLUGIN,)


@pytest.mark.parametrize("path", ["tests.plugins.no_such_kind", "not a module", 3])
def test_a_bad_plugin_is_named(path):
    with pytest.raises(spec_lib.SpecError, match=f"plugin {path!r}"):
        spec_lib.from_dict({**SPEC, "plugins": [path]})


def test_plugins_must_be_a_list():
    with pytest.raises(spec_lib.SpecError, match="'plugins' must be a list"):
        spec_lib.from_dict({**SPEC, "plugins": PLUGIN})


def test_the_kind_trains_and_changes_the_pathway():
    ex = LocalExecutor(spec_lib.from_dict(SPEC), seed=1)
    tokens = np.array([list(b"def f(x):")], np.int32)
    # The scale (1.5 at init) multiplies what the attention module sees.
    assert np.abs(ex.forward("scaled", tokens) - ex.forward("plain", tokens)).max() > 1e-3
    loss, grads = ex.loss_and_grads("scaled", tokens[:, :-1], tokens[:, 1:])
    assert np.isfinite(float(loss)) and float(np.abs(grads["scale"]["scale"][...])) > 0


@pytest.mark.slow
def test_a_plugin_kind_through_module_servers_and_the_gateway_matches_local(tmp_path):
    spec = spec_lib.from_dict(SPEC)
    local = LocalExecutor(spec, seed=2)
    ckpt.save_spec(tmp_path, spec, ByteTokenizer())
    for name in spec.modules:
        ckpt.save_module(tmp_path, name, local.state(name))
    # The servers and the gateway get the kind only from the checkpoint's spec.
    assert PLUGIN in (tmp_path / "spec.yaml").read_text()
    unfused = LocalExecutor(spec, states={m: local.state(m) for m in spec.modules}, fuse=False)
    ids = list(PROMPT.encode())
    want = gen.greedy_ids(local, "scaled", ids, N)
    np.testing.assert_array_equal(gen.greedy_ids(unfused, "scaled", ids, N), want)
    with launcher.Fleet(str(tmp_path), list(spec.modules)) as f:
        ex = RemoteExecutor(spec, f.endpoints)
        try:
            np.testing.assert_array_equal(gen.greedy_ids(ex, "scaled", ids, N), want)
            s_remote = ex.open_session("scaled", [SamplingParams()])
            s_local = local.open_session("scaled", [SamplingParams()])
            got = ex.prefill(s_remote, [ids], return_logits=True).logits
            ref = local.prefill(s_local, [ids], return_logits=True).logits
            np.testing.assert_allclose(got, ref, atol=1e-4)
            ex.close_session(s_remote)
            local.close_session(s_local)
        finally:
            ex.close()
        text = gen.generate(
            local, "scaled", [PROMPT], ByteTokenizer(), SamplingParams(max_new_tokens=N)
        )[0]
        gw = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(f.gateway.address))
        req = gateway_pb2.GenerateRequest(
            pathway="scaled", prompt=PROMPT, sampling=gateway_pb2.SamplingOptions(max_new_tokens=N)
        )
        assert [e.token_id for e in gw.Generate(req, timeout=120)] == text.token_ids
