"""Every size a request chooses is bounded before the server allocates it (issue 17): the attacks
of the issue, each refused with its status and a message naming the limit, against real module
servers (in this process, tiny modules) and a real gateway process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pathways import codec, transport
from pathways.deploy import launcher
from pathways.pipeline import service as training
from pathways.serving import limits
from pathways.serving.server import ModuleServer
from pathways.serving.settings import ModuleServerSettings
from pathways.serving.testing import make_checkpoint
from pathways.v1 import module_pb2, module_pb2_grpc, tensor_pb2, training_pb2, training_pb2_grpc

pytestmark = pytest.mark.slow
SPEC = {
    "tokenizer": {"kind": "byte"},
    "modules": {
        "embed": {"kind": "embedding", "vocab_size": 257, "d_model": 32, "max_seq_len": 64},
        "attn": {"kind": "attention", "d_model": 32, "n_layers": 1, "n_heads": 2,
                 "max_seq_len": 64},
        "head": {"kind": "decoding", "d_model": 32, "vocab_size": 257},
    },
    "pathways": {"micro": ["embed", "attn", "head"]},
}  # fmt: skip
LIMITS = dict(max_call_tokens=512, max_micro_batches=8, max_inbox_mb=1.0, max_programs=12)


def micro_checkpoint(directory) -> str:
    spec = directory / "micro.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    make_checkpoint(directory / "ckpt", spec)
    return str(directory / "ckpt")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return micro_checkpoint(tmp_path_factory.mktemp("bounds"))


@pytest.fixture(scope="module")
def servers(ckpt):
    started = {}
    try:
        for name in ("embed", "attn", "head"):
            s = ModuleServer(
                ModuleServerSettings(ckpt, name, insecure=True, workers=6, **LIMITS),
                add_ons=[training.ADD_ON],
            )
            s.start()
            started[name] = s
        yield started
    finally:
        for s in started.values():
            s.stop(0)


def _channel(server: ModuleServer) -> grpc.Channel:
    return transport.channel(f"127.0.0.1:{server.port}", tls=transport.TLSConfig.plaintext())


def _status(call, request, timeout=30):
    try:
        r = call(request, timeout=timeout)
        if not hasattr(r, "ByteSize"):
            list(r)
        return None, ""
    except grpc.RpcError as e:
        return e.code(), e.details()


def _session(stub, batch=1, max_seq_len=0) -> str:
    req = module_pb2.OpenSessionRequest(batch_size=batch, max_seq_len=max_seq_len)
    return stub.OpenSession(req, timeout=30).session_id


def test_prefill_width_and_positions_are_bounded(servers):
    with _channel(servers["embed"]) as ch:
        stub = module_pb2_grpc.ModuleServiceStub(ch)
        sid = _session(stub)
        # The 8 MB embedding Prefill (+3 GB): positions beyond the session's length.
        wide = np.zeros((1, 2_000_000), np.int32)
        req = module_pb2.PrefillRequest(
            session_id=sid, input=codec.encode(wide), starts=[0], lengths=[8]
        )
        code, msg = _status(stub.Prefill, req)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_call_tokens = 512" in msg and "2000000 elements" in msg
        req.input.CopyFrom(codec.encode(np.zeros((1, 65), np.int32)))
        code, msg = _status(stub.Prefill, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert msg == "input has 65 positions; the session's max_seq_len is 64"
        # Within the session and the elements, but not once padded: 12 rows x 40 -> 64 positions.
        sid12 = _session(stub, batch=12)
        req = module_pb2.PrefillRequest(
            session_id=sid12,
            input=codec.encode(np.zeros((12, 40), np.int32)),
            starts=[0] * 12,
            lengths=[40] * 12,
        )
        code, msg = _status(stub.Prefill, req)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "12 rows x 64 positions = 768, over max_call_tokens = 512" in msg
        # starts = 2**31 - 1 (came back INTERNAL once: starts + lengths wrapped).
        req = module_pb2.PrefillRequest(
            session_id=sid,
            input=codec.encode(np.zeros((1, 8), np.int32)),
            starts=[2**31 - 1],
            lengths=[8],
        )
        code, msg = _status(stub.Prefill, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "starts[0] = 2147483647" in msg
        # Forward: the batch is bounded as well (it is padded to a power of two).
        fwd = module_pb2.ForwardRequest(input=codec.encode(np.zeros((100, 8), np.int32)))
        code, msg = _status(stub.Forward, fwd)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "128 rows x 8 positions = 1024, over max_call_tokens = 512" in msg


def test_int8_tensors_never_expand_past_their_bytes(servers):
    """The issue's 191-byte int8 tensor that made a server allocate 1 GB via block_size."""
    with _channel(servers["attn"]) as ch:
        stub = module_pb2_grpc.ModuleServiceStub(ch)
        sid = _session(stub)
        t = tensor_pb2.Tensor(
            dtype=tensor_pb2.DType.DTYPE_INT8_BLOCK,
            shape=[1, 1, 32],
            data=bytes(32),
            scales=bytes(4),
            block_size=2**30,
        )
        req = module_pb2.DecodeRequest(session_id=sid, input=t, positions=[0])
        code, msg = _status(stub.Decode, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "block_size" in msg
        # A shape claiming many elements with few bytes: refused before decoding.
        t = tensor_pb2.Tensor(dtype=tensor_pb2.DType.DTYPE_INT8_BLOCK, shape=[1, 2**40, 32])
        req = module_pb2.DecodeRequest(session_id=sid, input=t, positions=[0])
        code, msg = _status(stub.Decode, req)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_call_tokens" in msg


def test_compiled_programs_are_capped(servers):
    """Each new (batch, length) shape compiles a program: past max_programs new shapes are
    refused, shapes already compiled keep working."""
    srv = servers["attn"]
    with _channel(srv) as ch:
        stub = module_pb2_grpc.ModuleServiceStub(ch)
        codes = []
        for b in range(1, 16):  # padded: 1, 2, 4, 8, 16 rows x 8, 16, 32 positions
            for t in (8, 16, 32):
                x = np.zeros((b, t, 32), np.float32)
                req = module_pb2.ForwardRequest(input=codec.encode(x))
                codes.append(_status(stub.Forward, req)[0])
        assert len(srv.servicer.engine.programs) <= 12
        refused = [c for c in codes if c is not None]
        assert refused and set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        code, msg = _status(stub.Forward, req)
        assert "max_programs = 12" in msg
        # A shape compiled before still runs.
        x = np.zeros((1, 8, 32), np.float32)
        assert _status(stub.Forward, module_pb2.ForwardRequest(input=codec.encode(x)))[0] is None


def test_memory_budget_refuses_calls_that_would_exceed_it(servers):
    srv = servers["attn"]
    with _channel(srv) as ch:
        stub = module_pb2_grpc.ModuleServiceStub(ch)
        sid = _session(stub)
        req = module_pb2.PrefillRequest(
            session_id=sid,
            input=codec.encode(np.zeros((1, 8, 32), np.float32)),
            starts=[0],
            lengths=[8],
        )
        assert _status(stub.Prefill, req)[0] is None
        saved = srv.budget.limit
        srv.budget.limit = limits.resident_bytes() + 1000  # less than one Prefill's estimate
        try:
            code, msg = _status(stub.Prefill, req)
        finally:
            srv.budget.limit = saved
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Prefill needs about" in msg and "memory_budget_mb" in msg
        assert _status(stub.Prefill, req)[0] is None


def test_a_server_over_its_memory_budget_at_start_does_not_start(ckpt):
    proc = subprocess.run(
        [sys.executable, "-m", launcher.MODULE_SERVER, "--checkpoint", ckpt, "--module", "attn",
         "--insecure", "--memory-budget-mb", "50", "--cpu-threads", "1"],
        env=launcher.child_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "over its memory_budget_mb = 50 (--memory-budget-mb)" in proc.stderr


def test_training_requests_are_bounded(servers):
    with _channel(servers["attn"]) as ch:
        stub = training_pb2_grpc.TrainingServiceStub(ch)
        stub.Configure(
            training_pb2.ConfigureRequest(
                module="attn", optimizer=training_pb2.OptimizerConfig(lr=1e-3, steps=10)
            ),
            timeout=30,
        )
        # The 44-byte RunStep that allocated 5.8 GB through micro_batches.
        req = training_pb2.RunStepRequest(
            step=1, schedule="1f1b", micro_batches=2**31 - 1, stage=1, stages=3, next="x",
            previous="y",
        )  # fmt: skip
        code, msg = _status(stub.RunStep, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert msg == "micro_batches = 2147483647 exceeds the server's max_micro_batches = 8"
        # Deliveries for steps nobody runs: bounded in bytes and in count.
        big = codec.encode(np.zeros((1, 256, 32), np.float32))  # 32 KiB each
        many = (training_pb2.DeliverRequest(step=s, micro_batch=0, tensor=big) for s in range(100))
        code, msg = _status(stub.Deliver, many)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_inbox_mb = 1" in msg
        stub.Reset(training_pb2.ResetRequest(), timeout=30)
        small = (training_pb2.DeliverRequest(step=s, micro_batch=0) for s in range(100))
        code, msg = _status(stub.Deliver, small)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_micro_batches" in msg
        stub.Reset(training_pb2.ResetRequest(), timeout=30)
        # A training input over the tokens per call.
        x = codec.encode(np.zeros((16, 64, 32), np.float32))
        code, msg = _status(stub.Forward, training_pb2.TrainForwardRequest(input=x))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_call_tokens = 512" in msg


def _health(port: int) -> int:
    with transport.channel(f"127.0.0.1:{port}", tls=transport.TLSConfig.plaintext()) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        return r.status


def test_health_answers_while_idle_decode_streams_hold_the_threads(servers):
    """Idle DecodeStreams once held every handler thread of a --workers 4 server and its health
    check timed out. Streams may take workers - 2 threads (here 4 of 6); more are refused, and
    health on the main port answers within a second."""
    srv = servers["attn"]
    stop = threading.Event()
    calls, codes = [], []
    with _channel(srv) as ch:
        stub = module_pb2_grpc.ModuleServiceStub(ch)

        def idle():  # a stream that never sends
            while not stop.wait(0.05):
                pass
            yield from ()

        for _ in range(6):
            calls.append(stub.DecodeStream(idle(), timeout=60))
        time.sleep(1.0)
        t0 = time.monotonic()
        assert _health(srv.port) == health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - t0 < 1.0
        assert srv.streams.active == 4
        stop.set()
        for c in calls:
            try:
                list(c)
                codes.append(None)
            except grpc.RpcError as e:
                codes.append((e.code(), e.details()))
    refused = [c for c in codes if c is not None]
    assert len(refused) == 2
    assert all(c == grpc.StatusCode.RESOURCE_EXHAUSTED for c, _ in refused)
    assert "4 streaming calls already hold this server's handler threads" in refused[0][1]
    deadline = time.monotonic() + 5
    while srv.streams.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.streams.active == 0  # every stream's slot came back


def test_the_gateway_bounds_prompts_before_tokenizing(servers, ckpt):
    from pathways import checkpoint
    from pathways.serving.gateway import MAX_PROMPT_BYTES, GatewayServer
    from pathways.v1 import gateway_pb2, gateway_pb2_grpc

    spec, tok = checkpoint.load_spec(ckpt)
    endpoints = {m: [f"127.0.0.1:{s.port}"] for m, s in servers.items()}
    gw = GatewayServer(spec, tok, endpoints, tls=transport.TLSConfig.plaintext())
    gw.start()
    try:
        with transport.channel(f"127.0.0.1:{gw.port}", tls=transport.TLSConfig.plaintext()) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            opts = gateway_pb2.SamplingOptions(max_new_tokens=2)
            big = gateway_pb2.GenerateRequest(pathway="micro", prompt="é" * 200_000, sampling=opts)
            code, msg = _status(stub.Generate, big)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert msg == (
                f"prompt has 400000 bytes, over the gateway's max_prompt_bytes = "
                f"{MAX_PROMPT_BYTES} (--max-prompt-bytes)"
            )
            ok = gateway_pb2.GenerateRequest(pathway="micro", prompt="ab", sampling=opts)
            assert _status(stub.Generate, ok) == (None, "")
    finally:
        gw.stop(0)


def test_the_http_front_answers_a_shape_over_max_programs_with_400(servers, ckpt):
    """A module server whose max_programs is reached refuses a new shape for good (until it
    restarts): through the gateway and the HTTP front that is 400 naming the prompt, not 429
    (waiting would not help) and without Retry-After."""
    import httpx

    from pathways import checkpoint
    from pathways.serving.gateway import GatewayServer

    srv = servers["attn"]
    with _channel(srv) as ch:  # fill the cap with shapes of our own
        stub = module_pb2_grpc.ModuleServiceStub(ch)
        for b in (1, 2, 4, 8, 16):
            for t in (8, 16, 32):
                x = np.zeros((b, t, 32), np.float32)
                _status(stub.Forward, module_pb2.ForwardRequest(input=codec.encode(x)))
    assert len(srv.servicer.engine.programs) == LIMITS["max_programs"]
    spec, tok = checkpoint.load_spec(ckpt)
    endpoints = {m: [f"127.0.0.1:{s.port}"] for m, s in servers.items()}
    gw = GatewayServer(spec, tok, endpoints, tls=transport.TLSConfig.plaintext())
    gw.start()
    front = launcher.start_http_front(f"127.0.0.1:{gw.port}")
    try:
        launcher.wait_http_ready(front, 60)
        body = {"model": "micro", "prompt": "x" * 40, "max_tokens": 2}  # 64 positions: new
        r = httpx.post(front.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["code"]) == ("prompt", "max_programs_exceeded")
        assert "max_programs = 12" in err["message"] and "Retry-After" not in r.headers
    finally:
        front.stop()
        gw.stop(0)
