"""RPC fuzzing (issue 17): random and adversarial requests to every RPC of every service of a real
deployment (module servers with TrainingService, a gateway, health), drawn by hypothesis.

Every call must be answered with a status within its deadline (never INTERNAL or UNKNOWN: a bad
request is the client's error), no server may die, each server's resident memory must stay under
its memory budget + 10 %, and health must stay SERVING. Tensors get random dtypes, byte lengths,
scales and block sizes, with shapes drawn from the buckets the servers run plus invalid ones, so
the run is not a compile benchmark (the servers' max_programs caps compilation anyway).

`tests/fuzz_test.py` runs >= 2,000 calls in CI; this script runs as many as asked and writes
the counts (calls per status code per RPC) as a dated JSON record:

    PYTHONPATH=libs:.:build/gen python tools/bench/fuzz.py --calls 20000
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pathways import codec, transport
from pathways.deploy.launcher import Fleet
from pathways.serving.testing import make_checkpoint
from pathways.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    module_pb2,
    module_pb2_grpc,
    tensor_pb2,
    training_pb2,
    training_pb2_grpc,
)

D_MODEL = 32
SPEC = {
    "tokenizer": {"kind": "byte"},
    "modules": {
        "embed": {"kind": "embedding", "vocab_size": 257, "d_model": D_MODEL, "max_seq_len": 64},
        "attn": {"kind": "attention", "d_model": D_MODEL, "n_layers": 1, "n_heads": 2,
                 "max_seq_len": 64},
        "head": {"kind": "decoding", "d_model": D_MODEL, "vocab_size": 257},
    },
    "pathways": {"micro": ["embed", "attn", "head"]},
}  # fmt: skip
MODULES = list(SPEC["modules"])
BUDGET_MB = 1500  # each module server's --memory-budget-mb
SERVER_ARGS = [
    "--memory-budget-mb", str(BUDGET_MB), "--max-programs", "48", "--max-call-tokens", "1024",
    "--max-micro-batches", "8", "--max-inbox-mb", "4", "--session-ttl-s", "10",
    "--workers", "16", "--max-slots", "16", "--training",
]  # fmt: skip
# Codes that mean the server failed, never the client.
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
TIMEOUT_S = 10.0  # each call's deadline
WAITING_TIMEOUT_S = 1.0  # calls that wait on other stages (RunStep, Steps, Deliver)


@dataclasses.dataclass
class Target:
    """A running deployment and what the strategies draw from it."""

    fleet: Fleet
    roots: Path  # the module servers' --path-roots (Save/Load may write here only)
    channels: dict[str, grpc.Channel]
    sessions: dict[str, list[str]]  # session ids the servers handed out, per module
    counts: collections.Counter  # (rpc, code name) -> calls
    slowest: dict  # rpc -> longest seconds to a status

    @property
    def addresses(self) -> dict[str, str]:
        return {m: self.fleet.endpoints[m][0] for m in MODULES}


@contextlib.contextmanager
def deployment(directory: Path, log=None):
    """A micro checkpoint's module servers (TrainingService mounted) and gateway, plaintext."""
    spec = directory / "micro.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    ckpt = directory / "ckpt"
    make_checkpoint(ckpt, spec)
    roots = directory / "roots"
    roots.mkdir()
    args = [*SERVER_ARGS, "--path-roots", str(roots), "--cpu-threads", "1"]
    env = {"PATHWAYS_INSECURE": "1"}
    with Fleet(str(ckpt), MODULES, env=env, log=log, module_args=args) as fleet:
        addresses = {m: fleet.endpoints[m][0] for m in MODULES}
        addresses["gateway"] = fleet.gateway.address
        plain = transport.TLSConfig.plaintext()
        channels = {k: transport.channel(a, tls=plain) for k, a in addresses.items()}
        try:
            yield Target(fleet, roots, channels, {m: [] for m in MODULES},
                         collections.Counter(), {})  # fmt: skip
        finally:
            for ch in channels.values():
                ch.close()


# ---- strategies -------------------------------------------------------------------------------
INT32 = st.one_of(
    st.sampled_from([0, 1, -1, 2, 7, 8, 63, 64, 65, 2**31 - 1, -(2**31)]),
    st.integers(-(2**31), 2**31 - 1),
)
SMALL = st.integers(0, 9)
UINT64 = st.one_of(st.sampled_from([0, 1, 2**64 - 1]), st.integers(0, 2**64 - 1))
FLOAT = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-9, 1e30, float("nan"), float("inf"), float("-inf")]),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
)
TEXT = st.one_of(
    st.sampled_from(["", "micro", "embed", "attn", "head", "../..", "a/b", ".", "x" * 5000]),
    st.text(max_size=40),
)
DTYPES = [
    tensor_pb2.DType.DTYPE_FLOAT32,
    tensor_pb2.DType.DTYPE_BFLOAT16,
    tensor_pb2.DType.DTYPE_INT32,
    tensor_pb2.DType.DTYPE_INT8_BLOCK,
]
ITEMSIZE = {DTYPES[0]: 4, DTYPES[1]: 2, DTYPES[2]: 4, DTYPES[3]: 1}


@st.composite
def tensors(draw, kind: str = "any"):
    """A Tensor with a shape from the servers' buckets (tokens (B, T); hidden (B, T, D)) or an
    invalid one; bytes right for its dtype and shape, or of a random length; random scales."""
    dtype = draw(st.one_of(st.sampled_from(DTYPES), st.sampled_from([0, 5, 99, -1])))
    b = draw(st.sampled_from([1, 2, 4, 8]))
    t = draw(st.sampled_from([1, 8, 16, 32, 64]))
    valid = [[b, t], [b, t, D_MODEL], [b, 1], [b, 1, D_MODEL]]
    invalid = st.lists(st.integers(-3, 2**40), max_size=4)
    shape = draw(st.one_of(st.sampled_from(valid), st.sampled_from([[b, t, 7], [0, t], []]),
                           invalid))  # fmt: skip
    t_ = tensor_pb2.Tensor(dtype=dtype if dtype >= 0 else 0)
    with contextlib.suppress(ValueError):
        t_.shape.extend(shape)
    n = 1
    for s in shape:
        n *= max(s, 0)
    size = ITEMSIZE.get(dtype, 4) * n
    if draw(st.booleans()) and size <= 1 << 20:
        if dtype == tensor_pb2.DType.DTYPE_INT32:  # token ids mostly in range
            hi = draw(st.sampled_from([256, 257, 2**31 - 1]))
            values = draw(st.lists(st.integers(-1, hi), min_size=1, max_size=4))
            t_.data = b"".join(int(values[i % len(values)]).to_bytes(4, "little", signed=True)
                               for i in range(n))  # fmt: skip
        else:
            t_.data = draw(st.binary(min_size=min(size, 64), max_size=min(size, 64))) * (
                size // max(1, min(size, 64))
            ) + bytes(size % max(1, min(size, 64)))
    else:
        t_.data = draw(st.binary(max_size=256))
    if dtype == tensor_pb2.DType.DTYPE_INT8_BLOCK:
        t_.block_size = draw(st.one_of(st.sampled_from([64, 32, 1, 0, 2**30]), INT32))
        blocks = max(1, n // max(1, abs(t_.block_size))) if n < 1 << 20 else 1
        t_.scales = draw(st.one_of(st.binary(max_size=64), st.just(bytes(4 * blocks))))
    return t_


INPUT = {"embed": "tokens", "attn": "hidden", "head": "hidden"}


@st.composite
def module_inputs(draw, module: str, b: int, t: int):
    """A well-formed input of `module` (token ids in range, or activations; sometimes NaN) on a
    random wire dtype: requests that reach the compute paths."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if INPUT[module] == "tokens":
        return codec.encode(rng.integers(0, 257, (b, t)).astype(np.int32))
    x = rng.standard_normal((b, t, D_MODEL)).astype(np.float32)
    if draw(st.integers(0, 9)) == 0:
        x[0, 0, 0] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
    return codec.encode(x, draw(st.sampled_from(["float32", "bfloat16", "int8"])))


def session_id(draw, target: Target, module: str) -> str:
    """Mostly a session the server handed out (the pool changes as calls run: every draw is
    made whatever its state, so hypothesis sees the same draws on a replay)."""
    use, index, text = draw(st.integers(0, 3)), draw(st.integers(0, 10**6)), draw(TEXT)
    pool = target.sessions[module]
    return pool[index % len(pool)] if pool and use else text


def module_call(draw, target: Target):
    m = draw(st.sampled_from(MODULES))
    stub = module_pb2_grpc.ModuleServiceStub(target.channels[m])
    rpc = draw(st.sampled_from(["Describe", "OpenSession", "Prefill", "Decode", "DecodeStream",
                                "CloseSession", "Forward", "Publish"]))  # fmt: skip
    if rpc == "Describe":
        return m, rpc, stub.Describe, module_pb2.DescribeRequest()
    if rpc == "Publish":
        req = module_pb2.PublishRequest(
            checkpoint=draw(st.one_of(st.just(""), st.just(str(target.roots)), TEXT)),
            from_training=draw(st.booleans()),
        )
        return m, rpc, stub.Publish, req
    if rpc == "OpenSession" and draw(st.booleans()):  # a valid one
        b = draw(st.sampled_from([1, 2]))
        req = module_pb2.OpenSessionRequest(
            batch_size=b, sampling=[module_pb2.RowSampling(top_p=1.0)] * b
        )
        return m, rpc, stub.OpenSession, req
    if rpc == "OpenSession":
        rows = draw(st.lists(st.builds(module_pb2.RowSampling, temperature=FLOAT, top_k=INT32,
                                       top_p=FLOAT, seed=UINT64), max_size=3))  # fmt: skip
        req = module_pb2.OpenSessionRequest(
            batch_size=draw(st.one_of(st.sampled_from([1, 2, 4]), INT32)),
            max_seq_len=draw(st.one_of(st.sampled_from([0, 16, 64]), INT32)),
            sampling=rows,
        )
        return m, rpc, stub.OpenSession, req
    if rpc == "CloseSession":
        return (
            m,
            rpc,
            stub.CloseSession,
            module_pb2.CloseSessionRequest(session_id=session_id(draw, target, m)),
        )
    valid = draw(st.booleans())
    b, t = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3, 8, 16]))
    if rpc == "Forward":
        x = draw(module_inputs(m, b, t)) if valid else draw(tensors())
        req = module_pb2.ForwardRequest(input=x, output_dtype=draw(st.sampled_from(
            DTYPES + [0, 77])))  # fmt: skip
        return m, rpc, stub.Forward, req
    ints = st.lists(INT32, max_size=4)
    small = st.lists(st.integers(0, 70), min_size=1, max_size=4)
    if rpc == "Prefill" and valid:
        req = module_pb2.PrefillRequest(
            session_id=session_id(draw, target, m),
            input=draw(module_inputs(m, b, t)),
            starts=[draw(st.integers(0, 40))] * b,
            lengths=[t] * b,
            steps=[0] * b,
            return_logits=draw(st.booleans()),
        )
        return m, rpc, stub.Prefill, req
    if rpc == "Prefill":
        req = module_pb2.PrefillRequest(
            session_id=session_id(draw, target, m),
            input=draw(tensors()),
            starts=draw(st.one_of(small, ints)),
            lengths=draw(st.one_of(small, ints)),
            steps=draw(st.one_of(small, ints)),
            return_logits=draw(st.booleans()),
            output_dtype=draw(st.sampled_from(DTYPES + [0, 77])),
        )
        return m, rpc, stub.Prefill, req

    def decode():
        if draw(st.booleans()):
            return module_pb2.DecodeRequest(
                session_id=session_id(draw, target, m),
                input=draw(module_inputs(m, b, 1)),
                positions=[draw(st.integers(0, 63))] * b,
                steps=[1] * b,
                return_logits=draw(st.booleans()),
            )
        return module_pb2.DecodeRequest(
            session_id=session_id(draw, target, m),
            input=draw(tensors()),
            positions=draw(st.one_of(small, ints)),
            steps=draw(st.one_of(small, ints)),
            return_logits=draw(st.booleans()),
            return_timing=draw(st.booleans()),
        )

    if rpc == "Decode":
        return m, rpc, stub.Decode, decode()
    msgs = []
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            msgs.append(module_pb2.DecodeStreamRequest(step=decode()))
        else:
            group = [decode() for _ in range(draw(st.integers(0, 3)))]
            msgs.append(module_pb2.DecodeStreamRequest(group=group))
    return m, rpc, stub.DecodeStream, msgs


def training_call(draw, target: Target):
    m = draw(st.sampled_from(MODULES))
    stub = training_pb2_grpc.TrainingServiceStub(target.channels[m])
    rpc = draw(st.sampled_from(["Configure", "Forward", "Backward", "Steps", "RunStep",
                                "Deliver", "Apply", "Evaluate", "Save", "Load", "Reset"]))  # fmt: skip
    mb = st.one_of(SMALL, INT32)

    valid = draw(st.booleans())
    b, t = draw(st.sampled_from([1, 2])), draw(st.sampled_from([4, 8]))

    def fwd():
        x = draw(module_inputs(m, b, t)) if valid else draw(tensors())
        req = training_pb2.TrainForwardRequest(micro_batch=draw(mb), input=x)
        if valid and m == "head":
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            req.targets.CopyFrom(codec.encode(rng.integers(0, 257, (b, t)).astype(np.int32)))
        elif draw(st.booleans()):
            req.targets.CopyFrom(draw(tensors()))
        return req

    def bwd():
        if valid:
            g = np.random.default_rng(draw(st.integers(0, 99))).standard_normal((b, t, D_MODEL))
            return training_pb2.TrainBackwardRequest(
                micro_batch=draw(SMALL) % 2, grad=codec.encode(g.astype(np.float32))
            )
        return training_pb2.TrainBackwardRequest(micro_batch=draw(mb), grad=draw(tensors()))

    if rpc == "Configure" and valid:
        opt = training_pb2.OptimizerConfig(lr=1e-3, steps=100)
        req = training_pb2.ConfigureRequest(module=m, optimizer=opt)
        return m, "Train" + rpc, stub.Configure, req
    if rpc == "Configure":
        opt = training_pb2.OptimizerConfig(
            lr=draw(FLOAT), warmup=draw(INT32), steps=draw(st.one_of(st.just(10), INT32)),
            min_lr_ratio=draw(FLOAT), weight_decay=draw(FLOAT), clip=draw(FLOAT),
        )  # fmt: skip
        name = draw(st.one_of(st.just(m), TEXT))
        req = training_pb2.ConfigureRequest(module=name, optimizer=opt, frozen=draw(st.booleans()))
        return m, "Train" + rpc, stub.Configure, req
    if rpc == "Forward":
        return m, "TrainForward", stub.Forward, fwd()
    if rpc == "Backward":
        return m, "TrainBackward", stub.Backward, bwd()
    if rpc == "Evaluate":
        req = training_pb2.EvaluateRequest(input=draw(tensors()))
        if draw(st.booleans()):
            req.targets.CopyFrom(draw(tensors()))
        return m, rpc, stub.Evaluate, req
    if rpc == "Steps":
        ops = [training_pb2.StepRequest(forward=fwd()) if draw(st.booleans())
               else training_pb2.StepRequest(backward=bwd()) for _ in range(draw(SMALL) % 3)]  # fmt: skip
        return m, rpc, stub.Steps, ops
    if rpc == "RunStep":
        addr = st.sampled_from([*target.addresses.values(), "", "127.0.0.1:1", "nowhere:1"])
        stages = draw(st.one_of(st.integers(1, 4), INT32))
        req = training_pb2.RunStepRequest(
            step=draw(UINT64), schedule=draw(st.sampled_from(["1f1b", "gpipe", "", "zz"])),
            micro_batches=draw(st.one_of(st.integers(1, 4), INT32)),
            stage=draw(st.one_of(st.integers(0, 3), INT32)), stages=stages,
            next=draw(addr), previous=draw(addr),
            inputs=draw(st.lists(tensors(), max_size=3)),
            targets=draw(st.lists(tensors(), max_size=3)),
        )  # fmt: skip
        return m, rpc, stub.RunStep, req
    if rpc == "Deliver":
        msgs = [
            training_pb2.DeliverRequest(step=draw(UINT64), micro_batch=draw(mb),
                                        gradient=draw(st.booleans()), tensor=draw(tensors()))
            for _ in range(draw(st.integers(0, 3)))
        ]  # fmt: skip
        return m, rpc, stub.Deliver, msgs
    if rpc in ("Save", "Load"):
        where = st.one_of(
            st.sampled_from(
                [str(target.roots / "a"), str(target.roots / ".." / "out"), "/", "/etc", "",
                 "relative/dir", str(target.roots / "a" / ".." / ".." / "x")]
            ),
            TEXT,
        )  # fmt: skip
        directory = draw(where)
        if rpc == "Save":
            return m, rpc, stub.Save, training_pb2.SaveRequest(directory=directory)
        return m, rpc, stub.Load, training_pb2.LoadRequest(directory=directory)
    if rpc == "Apply":
        return m, rpc, stub.Apply, training_pb2.ApplyRequest()
    return m, rpc, stub.Reset, training_pb2.ResetRequest()


def gateway_call(draw, target: Target):
    stub = gateway_pb2_grpc.GatewayServiceStub(target.channels["gateway"])
    rpc = draw(st.sampled_from(["Generate", "ListPathways", "AddModule", "SetPathway",
                                "RemovePathway", "Infer", "Publish"]))  # fmt: skip
    names = st.one_of(st.sampled_from(["fz", "fz2", "../x", "", "micro2"]), TEXT)
    if rpc == "Generate" and draw(st.booleans()):  # a valid one
        opts = gateway_pb2.SamplingOptions(
            temperature=draw(st.sampled_from([0.0, 0.8])), max_new_tokens=draw(st.integers(1, 4)),
            seed=draw(UINT64), stop=draw(st.lists(st.text(min_size=1, max_size=3), max_size=2)),
        )  # fmt: skip
        req = gateway_pb2.GenerateRequest(
            pathway="micro", prompt=draw(st.text(max_size=20)), sampling=opts
        )
        return "gateway", rpc, stub.Generate, req
    if rpc == "Generate":
        opts = gateway_pb2.SamplingOptions(
            temperature=draw(FLOAT), top_k=draw(INT32), seed=draw(UINT64),
            stop=draw(st.lists(st.text(max_size=draw(st.sampled_from([3, 5000]))), max_size=20)),
        )  # fmt: skip
        if draw(st.booleans()):
            opts.top_p = draw(FLOAT)
        if draw(st.booleans()):
            opts.max_new_tokens = draw(st.one_of(st.integers(0, 4), INT32))
        else:
            opts.max_new_tokens = 2
        prompt = draw(st.one_of(st.text(max_size=30), st.just("a" * 300_000),
                                st.just("é" * 100)))  # fmt: skip
        pathway = draw(st.one_of(st.just("micro"), st.just(""), names))
        req = gateway_pb2.GenerateRequest(pathway=pathway, prompt=prompt, sampling=opts)
        return "gateway", rpc, stub.Generate, req
    if rpc == "ListPathways":
        return "gateway", rpc, stub.ListPathways, gateway_pb2.ListPathwaysRequest()
    if rpc == "Publish":
        req = gateway_pb2.PublishModulesRequest(
            modules=draw(st.lists(st.one_of(st.sampled_from(MODULES), TEXT), max_size=2)),
            checkpoint=draw(st.one_of(st.just(""), st.just(str(target.roots)), TEXT)),
            from_training=draw(st.booleans()),
        )
        return "gateway", "GatewayPublish", stub.Publish, req
    if rpc == "AddModule":
        addrs = st.lists(st.one_of(st.sampled_from(list(target.addresses.values())), TEXT),
                         max_size=3)  # fmt: skip
        name = draw(st.one_of(st.sampled_from(MODULES), names))
        req = gateway_pb2.AddModuleRequest(name=name, addresses=draw(addrs))
        return "gateway", rpc, stub.AddModule, req
    if rpc == "SetPathway":
        mods = st.lists(st.one_of(st.sampled_from(MODULES), TEXT), max_size=4)
        req = gateway_pb2.SetPathwayRequest(name=draw(names), modules=draw(mods))
        return "gateway", rpc, stub.SetPathway, req
    if rpc == "RemovePathway":  # never "micro": the rest of the run generates through it
        req = gateway_pb2.RemovePathwayRequest(name=draw(names.filter(lambda n: n != "micro")))
        return "gateway", rpc, stub.RemovePathway, req
    req = gateway_pb2.InferRequest(
        pathway=draw(st.one_of(st.just("micro"), names)), top_k=draw(INT32),
        output=draw(st.sampled_from([0, 1, 7])),
    )  # fmt: skip
    which = draw(st.sampled_from(["tensor", "image", "wav", "text", "none"]))
    if which == "tensor":
        req.tensor.CopyFrom(draw(tensors()))
    elif which in ("image", "wav"):
        setattr(req, which, draw(st.binary(max_size=200)))
    elif which == "text":
        req.text = draw(st.text(max_size=50))
    return "gateway", rpc, stub.Infer, req


@st.composite
def calls(draw, target: Target):
    """(server, rpc name, callable, request or list of stream messages)."""
    service = draw(st.sampled_from(["module", "module", "training", "gateway", "health"]))
    if service == "module":
        return module_call(draw, target)
    if service == "training":
        return training_call(draw, target)
    if service == "gateway":
        return gateway_call(draw, target)
    where = draw(st.sampled_from([*MODULES, "gateway"]))
    stub = health_pb2_grpc.HealthStub(target.channels[where])
    name = draw(st.sampled_from(["", "pathways.v1.ModuleService", "nope", "x" * 1000]))
    return where, "HealthCheck", stub.Check, health_pb2.HealthCheckRequest(service=name)


# ---- running ----------------------------------------------------------------------------------
STREAMING_REQUESTS = {"DecodeStream", "Steps", "Deliver"}
WAITING = {"RunStep", "Steps", "Deliver"}


def call_once(target: Target, where: str, rpc: str, fn, request) -> grpc.StatusCode:
    """Makes the call and records its status; AssertionError when the status is a server fault
    or comes later than the deadline allows."""
    timeout = WAITING_TIMEOUT_S if rpc in WAITING else TIMEOUT_S
    t0 = time.monotonic()
    code = grpc.StatusCode.OK
    details = ""
    try:
        if rpc in STREAMING_REQUESTS:
            r = fn(iter(request), timeout=timeout)
        else:
            r = fn(request, timeout=timeout)
        if not hasattr(r, "ByteSize"):  # a response stream
            for _ in r:
                pass
        elif rpc == "OpenSession":
            target.sessions[where].append(r.session_id)
            del target.sessions[where][:-64]
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
    elapsed = time.monotonic() - t0
    target.counts[(rpc, code.name)] += 1
    target.slowest[rpc] = max(target.slowest.get(rpc, 0.0), elapsed)
    assert code not in SERVER_FAULTS, f"{where} {rpc}: {code.name}: {details}\n{request}"
    # A status within the deadline (+ slack for this loaded machine's scheduling).
    assert elapsed <= timeout + 5.0, f"{where} {rpc} took {elapsed:.1f} s (deadline {timeout} s)"
    return code


def resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def check_alive(target: Target) -> dict[str, float]:
    """Every process runs, is SERVING on its main port, and each module server's RSS is under
    its budget + 10 %; returns the RSS (MiB) of each."""
    rss = {}
    for m in MODULES:
        p = target.fleet.servers[m][0]
        assert p.proc.poll() is None, f"module server {m} died:\n{p.tail()}"
        rss[m] = resident_mb(p.proc.pid)
        assert rss[m] <= BUDGET_MB * 1.1, f"{m}: {rss[m]:.0f} MiB > budget {BUDGET_MB} + 10 %"
    g = target.fleet.gateway
    assert g.proc.poll() is None, f"gateway died:\n{g.tail()}"
    rss["gateway"] = resident_mb(g.proc.pid)
    for where, ch in target.channels.items():
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING, where
    return rss


def fuzz(target: Target, n: int, seed: int | None = None, check_every: int = 500) -> None:
    """Runs n drawn calls against `target` (hypothesis, generation phase only: the falsifying
    call is printed as drawn), checking the servers every `check_every` calls."""
    done = [0]
    peak: dict[str, float] = collections.defaultdict(float)
    lock = threading.Lock()

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=seed is None)  # fmt: skip
    @given(st.data())
    def one(data):
        where, rpc, fn, request = data.draw(calls(target))
        call_once(target, where, rpc, fn, request)
        with lock:
            done[0] += 1
            if done[0] % check_every == 0:
                for k, v in check_alive(target).items():
                    peak[k] = max(peak[k], v)

    if seed is not None:
        from hypothesis import seed as with_seed

        one = with_seed(seed)(one)
    one()
    for k, v in check_alive(target).items():
        peak[k] = max(peak[k], v)
    target.peak_rss_mb = dict(peak)


def summary(target: Target) -> dict:
    per_rpc: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (rpc, code), n in sorted(target.counts.items()):
        per_rpc[rpc][code] = n
    return {
        "calls": sum(target.counts.values()),
        "per_rpc": dict(per_rpc),
        "slowest_s": {k: round(v, 3) for k, v in sorted(target.slowest.items())},
        "peak_rss_mb": {k: round(v) for k, v in getattr(target, "peak_rss_mb", {}).items()},
        "budget_mb": BUDGET_MB,
    }


def main(argv: list[str] | None = None) -> int:
    from tools.bench.common import dated_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="tools/bench/results")
    args = p.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        with deployment(Path(d)) as target:
            fuzz(target, args.calls, seed=args.seed)
            result = summary(target)
    result.update(
        command=f"PYTHONPATH=libs:.:build/gen python tools/bench/fuzz.py --calls {args.calls} "
        f"--seed {args.seed}",
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        seconds=round(time.time() - t0),
        cpu=_cpu_model(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
    )
    path = dated_path(args.out, "fuzz")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
