"""bfloat16/int8 weights read from a checkpoint a few arrays at a time (`checkpoint.
stream_module`, `ModuleRuntime.load_serving`): the served copies equal those made from the whole
float32 tree, a module server's start and Publish use them, and the start's peak memory stays
below one float32 copy of the module."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import jax
import numpy as np
import pytest
from flax import nnx

from pathways import checkpoint as ckpt
from pathways import generate as gen
from pathways import modules as mod
from pathways import spec as spec_lib
from pathways import transport
from pathways.executor.local import LocalExecutor
from pathways.executor.remote import RemoteExecutor
from pathways.runtime import ModuleRuntime
from pathways.serving import testing
from pathways.serving.engine import ModuleEngine
from pathways.serving.server import ModuleServer
from pathways.serving.settings import ModuleServerSettings
from pathways.v1 import module_pb2, module_pb2_grpc

TINY = testing.EXAMPLES / "tiny.yaml"
IDS = list(b"def main():")


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """The tiny spec saved with seeds 0 and 1: (directory, its LocalExecutor) each."""
    out = []
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"seed{seed}")
        out.append((str(d), testing.make_checkpoint(d, TINY, seed=seed)))
    return out


def test_a_module_is_read_a_few_arrays_at_a_time(two_checkpoints, monkeypatch):
    (d, _), _ = two_checkpoints
    cfg = spec_lib.load(TINY).modules["attn-0"]
    reads = []
    read = ckpt._restore_partial

    def counting(path, item):
        reads.append(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(item)))
        return read(path, item)

    monkeypatch.setattr(ckpt, "_restore_partial", counting)
    whole = jax.tree_util.tree_flatten_with_path(ckpt.restore_module(d, "attn-0", cfg))[0]
    largest = max(x.nbytes for _, x in whole)
    got = list(ckpt.stream_module(d, "attn-0", cfg, chunk_bytes=largest))
    assert len(reads) > 2 and max(reads) <= largest, reads
    assert [p for p, _ in got] == [p for p, _ in whole]
    for (_, a), (_, b) in zip(got, whole):
        assert isinstance(a, np.ndarray) and a.dtype == np.float32
        np.testing.assert_array_equal(a, np.asarray(b))


def test_a_tree_of_another_shape_is_named_before_anything_is_read(two_checkpoints, tmp_path):
    (d, _), _ = two_checkpoints
    spec = spec_lib.load(TINY)
    with pytest.raises(ValueError, match=r"module 'attn-0' as configured \(DecodingConfig\)"):
        next(ckpt.stream_module(d, "attn-0", spec.modules["head"]))
    wide = mod.config_from_dict({"kind": "decoding", "d_model": 128, "vocab_size": 300})
    with pytest.raises(ValueError, match=r"head/kernel has shape \(128, 257\), not \(128, 300\)"):
        next(ckpt.stream_module(d, "head", wide))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        next(ckpt.stream_module(tmp_path, "head", wide))


@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
@pytest.mark.parametrize("native", [None, False])
def test_streamed_weights_equal_those_made_from_the_whole_tree(two_checkpoints, storage, native):
    (d, _), _ = two_checkpoints
    for name, cfg in spec_lib.load(TINY).modules.items():
        state = ckpt.restore_module(d, name, cfg)
        whole = ModuleRuntime(name, cfg, mod.from_state(cfg, state), weights=storage, native=native)
        whole.compact()
        e = ModuleEngine.from_checkpoint(name, cfg, d, 4, storage, native)
        assert e.rt._state is None  # never held as float32
        for prefill in (False, True):
            a, b = e.rt.serving_for(prefill), whole.serving_for(prefill)
            assert jax.tree.structure(a) == jax.tree.structure(b)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
                assert isinstance(x, jax.Array) and (x.dtype, x.shape) == (y.dtype, y.shape)
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(e.rt.state), jax.tree.leaves(whole.state)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_stream_that_fails_midway_changes_nothing(two_checkpoints):
    (d, _), ((d1, _)) = two_checkpoints
    cfg = spec_lib.load(TINY).modules["attn-0"]
    e = ModuleEngine.from_checkpoint("attn-0", cfg, d, 4, "int8", False)
    before, version = e.rt.serving_for(False), e.rt.version

    def broken():
        for i, item in enumerate(ckpt.stream_module(d1, "attn-0", cfg)):
            if i == 5:
                raise OSError("disk gone")
            yield item

    with pytest.raises(OSError, match="disk gone"):
        e.rt.load_serving(broken())
    assert e.rt.serving_for(False) is before and e.rt.version == version
    with pytest.raises(ValueError, match="5 parameters given, 32 expected"):
        e.rt.load_serving(x for i, x in enumerate(ckpt.stream_module(d1, "attn-0", cfg)) if i < 5)
    assert e.rt.serving_for(False) is before


def test_a_server_of_int8_weights_starts_and_publishes_from_streams(two_checkpoints, tmp_path):
    """One module server hosting the whole tiny pathway with int8 weights: its greedy tokens
    equal the local executor's of the same storage, before and after a Publish of another
    checkpoint; a checkpoint whose tree does not fit is refused and changes nothing."""
    (d0, local0), (d1, local1) = two_checkpoints
    spec = local0.spec
    names = ",".join(spec.modules)
    server = ModuleServer(ModuleServerSettings(d0, names, insecure=True, weights="int8"))
    server.start()
    address = f"127.0.0.1:{server.port}"
    ex = RemoteExecutor(spec, {m: [address] for m in spec.modules})
    channel = transport.channel(address, tls=transport.TLSConfig.plaintext())
    stub = module_pb2_grpc.ModuleServiceStub(channel)
    try:
        for d, local in ((d0, local0), (d1, local1)):
            if d == d1:
                r = stub.Publish(module_pb2.PublishRequest(checkpoint=d1), timeout=60)
                assert r.parameters == sum(
                    x.size for n in spec.modules for x in jax.tree.leaves(local.state(n))
                )
            states = {n: local.state(n) for n in spec.modules}
            reference = LocalExecutor(spec, states, weights="int8")
            want = gen.greedy_ids(reference, "tiny", IDS, 8)
            np.testing.assert_array_equal(gen.greedy_ids(ex, "tiny", IDS, 8), want)
        # attn-1's tree replaced by attn-0's of another layer count: refused, nothing changed.
        bad = tmp_path / "bad"
        shutil.copytree(d0, bad)
        shutil.rmtree(bad / "modules" / "attn-1")
        one_layer = dataclasses.replace(spec.modules["attn-1"], n_layers=1)
        ckpt.save_module(bad, "attn-1", nnx.state(mod.build(one_layer, seed=0)))
        with pytest.raises(grpc.RpcError) as err:
            stub.Publish(module_pb2.PublishRequest(checkpoint=str(bad)), timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "module 'attn-1' as configured" in err.value.details()
        assert "missing blocks/1/" in err.value.details()
        np.testing.assert_array_equal(gen.greedy_ids(ex, "tiny", IDS, 8), want)
    finally:
        ex.close()
        channel.close()
        server.stop(0)


PEAK_SCRIPT = """
import json, sys
import jax
from pathways import modules as mod
from pathways.serving.engine import ModuleEngine

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

d, weights, cfgs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cfg = mod.config_from_dict(cfgs["attn"])
probe = mod.config_from_dict(cfgs["probe"])
ModuleEngine.from_checkpoint("probe", probe, d, 0, weights)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from what is resident now
base = hwm()
e = ModuleEngine.from_checkpoint("attn", cfg, d, 0, weights)
grew = hwm() - base
served = {id(x): x.nbytes for n in (False, True) for x in jax.tree.leaves(e.rt.serving_for(n))}
print(json.dumps({"grew": grew, "served": sum(served.values())}))
"""


@pytest.mark.slow
def test_starting_reduced_weights_never_holds_the_float32_module(tmp_path):
    """A process reading a 24-layer module (~290 MiB as float32, arrays of at most 4 MiB) as
    int8 or bfloat16: its peak memory grows by the serving copies it keeps, one read of the
    checkpoint (`STREAM_CHUNK_BYTES`) and Orbax's own buffers, well below the float32 module
    (int8); before streaming it held the whole float32 tree beside the serving copies."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    attn = {"kind": "attention", "d_model": 512, "n_layers": 24, "n_heads": 8, "d_ff": 2048,
            "max_seq_len": 64}  # fmt: skip
    # One layer of the same shapes first: what does not grow with the module (imports, the
    # conversions' compiled programs, Orbax's threads) is resident before the peak is reset.
    probe = {**attn, "n_layers": 1}
    cfgs = {"attn": attn, "probe": probe}
    f32 = 0
    for name, raw in cfgs.items():
        state = nnx.state(mod.build(mod.config_from_dict(raw), seed=0))
        if name == "attn":
            f32 = sum(x.nbytes for x in jax.tree.leaves(state))
        ckpt.save_module(tmp_path, name, state)
        del state
    env_path = os.pathsep.join(p for p in sys.path if p)  # this test's imports, as they are
    mib = 2**20
    for weights in ("int8", "bfloat16"):
        r = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), weights, json.dumps(cfgs)],
            capture_output=True,
            text=True,
            timeout=300,
            env={"PYTHONPATH": env_path, "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        )
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        grew, served = got["grew"], got["served"]
        what = (
            f"{weights}: peak grew {grew / mib:.0f} MiB, serving copies {served / mib:.0f} MiB, "
            f"float32 module {f32 / mib:.0f} MiB"
        )
        print(what)
        assert grew < served + 0.4 * f32, what
        if weights == "int8":  # a quarter of the bytes (both kernel choices share one copy)
            assert served < 0.3 * f32 and grew < 0.6 * f32, what
