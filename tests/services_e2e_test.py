"""End to end: every module its own process, a gateway, the remote executor, bad input, failover."""

from __future__ import annotations

import collections
import contextlib
import select
import signal
import socket
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from pathways import client, codec, transport
from pathways import generate as gen
from pathways.deploy import launcher
from pathways.executor.remote import RemoteExecutor
from pathways.executor.replicas import RemoteError
from pathways.sampling import SamplingParams
from pathways.serving import testing
from pathways.tokenizers import ByteTokenizer
from pathways.v1 import gateway_pb2, gateway_pb2_grpc, module_pb2, module_pb2_grpc

pytestmark = pytest.mark.slow
PROMPT = "def main():"
N = 24


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    local = testing.make_checkpoint(d)
    # 1 MiB of KV cache = 2 slots of the tiny attention modules: small enough to fill in a test.
    f = launcher.Fleet(
        str(d),
        list(local.spec.modules),
        replicas={"attn-0": 2, "attn-1": 2},
        module_args=["--kv-cache-mb", "1", "--max-message-mb", "1"],
        metrics=True,
    )
    with f:
        yield f, local


def stub(address):
    return module_pb2_grpc.ModuleServiceStub(grpc.insecure_channel(address))


@pytest.mark.parametrize("pathway", ["tiny", "tiny-shallow"])
def test_greedy_through_services_matches_local(fleet, pathway):
    f, local = fleet
    ex = RemoteExecutor(local.spec, f.endpoints)
    try:
        ids = list(PROMPT.encode())
        np.testing.assert_array_equal(
            gen.greedy_ids(ex, pathway, ids, N), gen.greedy_ids(local, pathway, ids, N)
        )
    finally:
        ex.close()


def test_step_timing_accounts_for_each_hop_and_changes_no_token(fleet):
    f, local = fleet
    ex = RemoteExecutor(local.spec, f.endpoints, step_timing=True)
    try:
        ids = list(PROMPT.encode())
        np.testing.assert_array_equal(
            gen.greedy_ids(ex, "tiny", ids, N), gen.greedy_ids(local, "tiny", ids, N)
        )
        for m in local.spec.pathway("tiny").modules:
            timings = ex.step_timings[m]
            assert len(timings) >= N - 1, m  # one per decode step
            for call_us, handler_us, step_us in timings:
                assert 0 < step_us <= handler_us <= call_us, (m, call_us, handler_us, step_us)
    finally:
        ex.close()
    plain = RemoteExecutor(local.spec, f.endpoints)  # the default: servers report nothing
    try:
        gen.greedy_ids(plain, "tiny", list(PROMPT.encode()), 2)
        assert not any(plain.step_timings.values())
    finally:
        plain.close()


class _Source:
    """A ReplicaSource the test edits, as discovery does when `kubectl scale` adds/removes pods."""

    def __init__(self, addresses: dict[str, list[str]]):
        self.addresses = addresses

    def replicas(self, module: str) -> list[str]:
        return list(self.addresses.get(module, []))

    def subscribe(self, callback) -> None:
        pass


def test_new_sessions_follow_the_replica_source_and_old_ones_are_kept(fleet):
    f, local = fleet
    a, b = f.endpoints["attn-0"]
    src = _Source({**f.endpoints, "attn-0": [a]})
    ids = list(PROMPT.encode())
    want = gen.greedy_ids(local, "tiny-shallow", ids, N)
    ex = RemoteExecutor(local.spec, src)
    sessions, outs = [], []

    def start():
        s = ex.open_session("tiny-shallow", [SamplingParams(max_new_tokens=N)])
        sessions.append(s)
        outs.append([int(ex.prefill(s, [ids]).tokens[0])])
        return ex._sessions[s.id]["attn-0"].replica.address

    def step(i, n):
        for _ in range(n):
            outs[i].append(int(ex.decode(sessions[i], np.array(outs[i][-1:])).tokens[0]))

    try:
        assert start() == a
        step(0, 4)
        src.addresses["attn-0"] = [a, b]  # scaled up: the new replica takes the next session
        assert start() == b
        src.addresses["attn-0"] = [b]  # a leaves discovery (still running): nothing new goes there
        assert start() == b
        step(0, N - 5)  # ...but the session it holds carries on there, not replayed elsewhere
        assert ex._sessions[sessions[0].id]["attn-0"].replica.address == a
        step(1, N - 1)
        step(2, N - 1)
    finally:
        for s in sessions:
            ex.close_session(s)
        ex.close()
    for out in outs:
        np.testing.assert_array_equal(np.array(out), want)


@pytest.mark.parametrize("wire, limit", [("bfloat16", 2 * 128 + 128), ("int8", 128 + 128)])
def test_compressed_wire_dtypes_generate_within_the_byte_budget(fleet, wire, limit):
    f, local = fleet
    ex = RemoteExecutor(local.spec, f.endpoints, wire_dtype=wire)
    session = ex.open_session("tiny-shallow", [SamplingParams(max_new_tokens=8)])
    try:
        tok = ex.prefill(session, [list(PROMPT.encode())]).tokens
        before = ex.wire_bytes["attn-0"][0]
        for _ in range(4):
            tok = ex.decode(session, tok).tokens
            assert 0 <= int(tok[0]) < 257
        assert (ex.wire_bytes["attn-0"][0] - before) / 4 <= limit  # request bytes per step
    finally:
        ex.close_session(session)
        ex.close()


def test_gateway_streams_the_local_text(fleet):
    f, local = fleet
    want = gen.generate(local, "tiny", [PROMPT], ByteTokenizer(), SamplingParams(max_new_tokens=N))
    gw = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(f.gateway.address))
    req = gateway_pb2.GenerateRequest(
        pathway="tiny", prompt=PROMPT, sampling=gateway_pb2.SamplingOptions(max_new_tokens=N)
    )
    events = list(gw.Generate(req, timeout=60))
    assert [e.token_id for e in events] == want[0].token_ids
    assert "".join(e.text for e in events) == want[0].text
    assert events[-1].finish_reason == "length"
    with pytest.raises(grpc.RpcError) as e:
        list(gw.Generate(gateway_pb2.GenerateRequest(pathway="nope", prompt="x"), timeout=10))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        bad = gateway_pb2.GenerateRequest(prompt="x", sampling=gateway_pb2.SamplingOptions(top_p=2))
        list(gw.Generate(bad, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # the deadline reaches the module calls
        list(gw.Generate(req, timeout=0.001))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_sessions_in_step_travel_in_one_message_and_match_local(fleet):
    f, local = fleet
    prompts = [list(p.encode()) for p in (PROMPT, "import os", "class A:")]
    # Two pathways sharing modules: their sessions go in the same messages where they meet.
    pathways = ["tiny", "tiny-shallow", "tiny"]
    want = [gen.greedy_ids(local, p, ids, N) for p, ids in zip(pathways, prompts)]
    # A long lockstep wait: the three sessions always line up (a tiny step takes ~1 ms).
    ex = RemoteExecutor(local.spec, f.endpoints, lockstep_wait_s=1.0)
    sessions = [ex.open_session(p, [SamplingParams(max_new_tokens=N)]) for p in pathways]
    outs = [[int(ex.prefill(s, [ids]).tokens[0])] for s, ids in zip(sessions, prompts)]
    start, errors = threading.Barrier(len(prompts)), []

    def run(i):
        try:
            start.wait(30)
            while len(outs[i]) < N:
                outs[i].append(int(ex.decode(sessions[i], np.array(outs[i][-1:])).tokens[0]))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for s in sessions:
            ex.close_session(s)
        ex.close()
    assert not errors, errors
    for out, w in zip(outs, want):
        np.testing.assert_array_equal(np.array(out), w)
    counts = ex.step_counts
    assert counts["grouped"] > counts["alone"] and counts["regrouped_alone"] == 0, counts


def test_a_session_whose_deadline_passes_in_a_group_fails_and_the_others_go_on(fleet):
    """A session's deadline passes while its steps travel in groups with another session's: it
    fails with DEADLINE_EXCEEDED, and the session decoding beside it is neither held up nor
    changed. The failing session arrives last at the first module (it pauses before each step),
    so it sends their group there; where its deadline cuts the group's stream (its own), the
    other session, handed its step back, sends it alone."""
    f, local = fleet
    n = 200  # long enough to outlive the other session's deadline
    ids = [list(p.encode()) for p in (PROMPT, "import os")]
    want = gen.greedy_ids(local, "tiny", ids[1], n)
    # One replica of each module: both sessions' steps group at every hop.
    one = {m: a[:1] for m, a in f.endpoints.items()}
    ex = RemoteExecutor(local.spec, _Source(one), lockstep_wait_s=1.0)
    sessions = [ex.open_session("tiny", [SamplingParams(max_new_tokens=n)]) for _ in ids]
    outs = [[int(ex.prefill(s, [p]).tokens[0])] for s, p in zip(sessions, ids)]
    errors: dict[int, BaseException] = {}

    def run(i, seconds):
        def until(count):
            while len(outs[i]) < count:
                if seconds is not None:
                    # Last to the first module, so this session sends the group there.
                    time.sleep(0.002)
                outs[i].append(int(ex.decode(sessions[i], np.array(outs[i][-1:])).tokens[0]))

        try:
            until(8)  # the first steps compile the servers' programs: no deadline for them
            with ex.deadline(seconds):
                until(n)
        except BaseException as e:  # reported below
            errors[i] = e

    threads = [threading.Thread(target=run, args=a) for a in ((0, 0.15), (1, None))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a decode call hung"
    finally:
        for s in sessions:
            ex.close_session(s)
        ex.close()
    assert set(errors) == {0}, errors
    assert getattr(errors[0], "code", None) == grpc.StatusCode.DEADLINE_EXCEEDED, errors[0]
    assert 8 < len(outs[0]) < n  # it decoded in step with the other before its deadline
    np.testing.assert_array_equal(np.array(outs[1]), want)
    counts = ex.step_counts
    assert counts["grouped"] > 0, counts


def test_a_bad_step_in_a_group_fails_alone_and_the_stream_goes_on(fleet):
    f, _ = fleet
    s = stub(f.endpoints["embed"][0])
    sids = [
        s.OpenSession(module_pb2.OpenSessionRequest(batch_size=1), timeout=10).session_id
        for _ in range(3)
    ]
    tok = codec.encode(np.array([[5]], np.int32))
    ok = module_pb2.DecodeRequest(session_id=sids[0], input=tok, positions=[3])
    group = [
        ok,
        module_pb2.DecodeRequest(session_id="nope", input=tok, positions=[3]),
        module_pb2.DecodeRequest(
            session_id=sids[1], input=codec.encode(np.zeros((1, 1), np.float32)), positions=[3]
        ),
        module_pb2.DecodeRequest(session_id=sids[2], input=tok, positions=[-1]),
        ok,  # the same session twice in one group
    ]
    requests = iter(
        [module_pb2.DecodeStreamRequest(group=group), module_pb2.DecodeStreamRequest(step=ok)]
    )
    try:
        first, second = list(s.DecodeStream(requests, timeout=30))
    finally:
        for sid in sids:
            s.CloseSession(module_pb2.CloseSessionRequest(session_id=sid), timeout=10)
    codes = [grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND] + [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert [r.code for r in first.group] == [c.value[0] for c in codes]
    assert "'nope'" in first.group[1].message
    assert "int32 tokens" in first.group[2].message and "float32" in first.group[2].message
    assert "positions[0] = -1" in first.group[3].message
    assert "another step in the group" in first.group[4].message
    assert first.group[0].step.output == second.step.output  # and the stream went on


def _status(call, *args, **kw):
    with pytest.raises(grpc.RpcError) as e:
        call(*args, timeout=10, **kw)
    return e.value.code(), e.value.details()


def test_bad_input_gets_its_status_and_the_server_keeps_serving(fleet):
    f, _ = fleet
    s = stub(f.servers["attn-1"][0].address)
    sid = s.OpenSession(module_pb2.OpenSessionRequest(batch_size=1), timeout=10).session_id
    good = codec.encode(np.zeros((1, 1, 128), np.float32))
    cases = {
        "dtype": (codec.encode(np.zeros((1, 1, 128), np.int32)), "int32"),
        "shape": (codec.encode(np.zeros((1, 128), np.float32)), "[1, 128]"),
        "d_model": (codec.encode(np.zeros((1, 1, 64), np.float32)), "d_model 64"),
        "batch": (codec.encode(np.zeros((2, 1, 128), np.float32)), "batch 2"),
    }
    for name, (x, needle) in cases.items():
        code, msg = _status(
            s.Decode, module_pb2.DecodeRequest(session_id=sid, input=x, positions=[0])
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in msg, (name, msg)
    short = module_pb2.DecodeRequest(session_id=sid, input=good, positions=[0])
    short.input.data = short.input.data[:-2]
    code, msg = _status(s.Decode, short)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input.data has 510 bytes" in msg
    code, msg = _status(
        s.Decode, module_pb2.DecodeRequest(session_id=sid, input=good, positions=[999])
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "positions[0] = 999" in msg
    overflow = module_pb2.PrefillRequest(
        session_id=sid, input=good, lengths=[1], starts=[2**31 - 1]
    )
    code, msg = _status(s.Prefill, overflow)  # was INTERNAL: starts + lengths wrapped around
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "starts[0] = 2147483647" in msg, msg
    code, msg = _status(
        s.Decode, module_pb2.DecodeRequest(session_id="nope", input=good, positions=[0])
    )
    assert code == grpc.StatusCode.NOT_FOUND and "'nope'" in msg
    big = codec.encode(np.zeros((1, 4096, 128), np.float32))  # 2 MiB > --max-message-mb 1
    code, _ = _status(s.Forward, module_pb2.ForwardRequest(input=big))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    e = stub(f.servers["embed"][0].address)
    code, msg = _status(
        e.Forward, module_pb2.ForwardRequest(input=codec.encode(np.array([[1, 300]], np.int32)))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "token id 300" in msg
    # Still serving, and the session survived every bad call.
    out = s.Decode(module_pb2.DecodeRequest(session_id=sid, input=good, positions=[0]), timeout=10)
    assert list(out.output.shape) == [1, 1, 128]
    assert s.CloseSession(module_pb2.CloseSessionRequest(session_id=sid), timeout=10).closed
    assert s.Describe(module_pb2.DescribeRequest(), timeout=10).sessions == 0


def test_full_kv_cache_refuses_new_sessions_only(fleet):
    f, _ = fleet
    s = stub(f.servers["attn-1"][0].address)
    cap = s.Describe(module_pb2.DescribeRequest(), timeout=10).capacity
    assert cap == 2
    sids = [
        s.OpenSession(module_pb2.OpenSessionRequest(batch_size=1), timeout=10).session_id
        for _ in range(cap)
    ]
    with pytest.raises(grpc.RpcError) as e:
        s.OpenSession(module_pb2.OpenSessionRequest(batch_size=1), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after" in e.value.details()
    assert dict(e.value.trailing_metadata())["retry-after-ms"] == "1000"
    x = codec.encode(np.ones((1, 1, 128), np.float32))
    for sid in sids:  # existing sessions untouched
        s.Decode(module_pb2.DecodeRequest(session_id=sid, input=x, positions=[0]), timeout=10)
        s.CloseSession(module_pb2.CloseSessionRequest(session_id=sid), timeout=10)
    s.CloseSession(module_pb2.CloseSessionRequest(session_id=sids[0]), timeout=10)  # idempotent


PROMPTS = [list(p.encode()) for p in (PROMPT, "import os")]


@contextlib.contextmanager
def _two_sessions_on_an_extra_replica(fleet, args, **executor_options):
    """Yields (the extra attn-0 replica, the executor, a `tiny` session per PROMPTS) with both
    sessions on a replica of the test's own (started with `args`, killed after), so the
    fixture's stay alive; the fixture's attn-0 replicas are where the sessions can move to."""
    f, local = fleet
    extra = launcher.start_module(f.checkpoint, "attn-0", f.server_env(9), None, args)
    ex = None
    try:
        launcher.wait_healthy(extra.address, extra.proc, 300)
        src = _Source({**f.endpoints, "attn-0": [extra.address]})
        ex = RemoteExecutor(local.spec, src, **executor_options)
        sessions = [ex.open_session("tiny", [SamplingParams(max_new_tokens=N)]) for _ in PROMPTS]
        assert {ex._sessions[s.id]["attn-0"].replica.address for s in sessions} == {extra.address}
        src.addresses["attn-0"] = f.endpoints["attn-0"]  # where they can move to
        yield extra, ex, sessions
    finally:
        if ex is not None:
            ex.close()
        extra.kill()


def test_killing_the_replica_a_group_is_sent_to_gives_every_session_its_text(fleet):
    f, local = fleet
    want = [gen.greedy_ids(local, "tiny", ids, N) for ids in PROMPTS]
    with _two_sessions_on_an_extra_replica(fleet, f.module_args, lockstep_wait_s=1.0) as (
        extra,
        ex,
        sessions,
    ):
        outs = [[int(ex.prefill(s, [ids]).tokens[0])] for s, ids in zip(sessions, PROMPTS)]
        errors = []

        def steps(i, until):
            try:
                while len(outs[i]) < until:
                    tok = ex.decode(sessions[i], np.array(outs[i][-1:])).tokens
                    outs[i].append(int(tok[0]))
            except BaseException as e:  # reported below
                errors.append(e)

        for until in (N // 2, N):
            threads = [threading.Thread(target=steps, args=(i, until)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            if until < N:
                assert ex.step_counts["grouped"] > 0
                extra.kill()  # mid-generation, with both sessions' caches on it
        assert not errors, errors
        assert ex.step_counts["regrouped_alone"] > 0  # the group failed; each step went alone
        for s in sessions:
            assert ex._sessions[s.id]["attn-0"].replica.address != extra.address
            ex.close_session(s)
    for out, w in zip(outs, want):
        np.testing.assert_array_equal(np.array(out), w)


def test_a_step_cut_by_a_stopping_replica_moves_its_session(fleet):
    """SIGTERM (a scale-down; grace 0, so what is still open on the replica is cut at once) while
    a step is in flight there: that session and the other one on the replica move and replay,
    and their texts are the local ones. The step is held in flight by the batcher (a 3 s batch
    wait, another session active). The SIGKILL tests cover abrupt death."""
    f, local = fleet
    want = [gen.greedy_ids(local, "tiny", ids, N) for ids in PROMPTS]
    args = [*f.module_args, "--grace-s", "0", "--batch-wait-ms", "3000"]
    with _two_sessions_on_an_extra_replica(fleet, args) as (extra, ex, (a, b)):
        outs = [[int(ex.prefill(s, [ids]).tokens[0])] for s, ids in zip((a, b), PROMPTS)]

        def step(i, s):
            outs[i].append(int(ex.decode(s, np.array(outs[i][-1:])).tokens[0]))

        step(1, b)  # b is active: a's next step waits in attn-0's batcher for b's
        errors = []

        def a_step():
            try:
                step(0, a)
            except BaseException as e:  # reported below
                errors.append(e)

        t = threading.Thread(target=a_step)
        t.start()
        time.sleep(1.0)
        assert t.is_alive()  # a's step is held at attn-0
        extra.stop()
        t.join(60)
        assert not errors, errors
        for i, s in enumerate((a, b)):
            while len(outs[i]) < N:
                step(i, s)
            assert ex._sessions[s.id]["attn-0"].replica.address != extra.address
            ex.close_session(s)
    for out, w in zip(outs, want):
        np.testing.assert_array_equal(np.array(out), w)


def test_closing_a_session_mid_step_ends_the_step_and_moves_nothing(fleet):
    """Another thread closes a session while its step is in flight (held by the batcher): the
    step ends CANCELLED (this process cancelled it) and the session is not moved anywhere."""
    f, _ = fleet
    args = [*f.module_args, "--batch-wait-ms", "3000"]
    fleet_sessions = lambda: [  # noqa: E731
        stub(a).Describe(module_pb2.DescribeRequest(), timeout=10).sessions
        for a in f.endpoints["attn-0"]
    ]
    before = fleet_sessions()
    with _two_sessions_on_an_extra_replica(fleet, args) as (extra, ex, (a, b)):
        first = [int(ex.prefill(s, [ids]).tokens[0]) for s, ids in zip((a, b), PROMPTS)]
        ex.decode(b, np.array(first[1:]))  # b is active: a's next step waits in the batcher
        errors = []

        def a_step():
            try:
                ex.decode(a, np.array(first[:1]))
            except RemoteError as e:
                errors.append(e)

        t = threading.Thread(target=a_step)
        t.start()
        time.sleep(1.0)
        assert t.is_alive()  # a's step is held at attn-0
        ex.close_session(a)
        t.join(30)
        ex.close_session(b)
        assert [e.code for e in errors] == [grpc.StatusCode.CANCELLED], errors
        assert ex.moves == {}
        assert fleet_sessions() == before  # nothing was opened on the replicas it could move to
        # The replica frees a's rows once the held step has run (within the batch wait), b's at once.
        left = lambda: stub(extra.address).Describe(module_pb2.DescribeRequest()).sessions  # noqa
        deadline = time.monotonic() + 10
        while left() != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left() == 0


class _HeldReplies:
    """A TCP proxy in front of `address` whose replies to the client can be held (`hold`) and let
    through later (`let_through`): calls still reach the server, answers wait in the proxy. New
    connections go to `target`, which a test may change (a Service whose endpoints changed)."""

    def __init__(self, address: str):
        self.target = address
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._held = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self._held.set()

    def let_through(self) -> None:
        self._held.clear()

    def close(self) -> None:
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            host, port = self.target.rsplit(":", 1)
            server = socket.create_connection((host, int(port)))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        held, open_ = b"", True
        with client, server:
            while open_ or held:
                if open_:
                    for s in select.select([client, server], [], [], 0.01)[0]:
                        data = s.recv(65536)
                        if not data:
                            open_ = False  # what the server said before closing still goes
                        elif s is client:
                            server.sendall(data)
                        else:
                            held += data
                else:
                    time.sleep(0.01)
                if held and not self._held.is_set():
                    client.sendall(held)
                    held = b""


def _stop_and_wait_for_shutdown(proc: launcher.Process) -> None:
    """SIGTERM, then returns once its gRPC server has begun to shut down (asked straight, not
    through a proxy)."""
    proc.proc.send_signal(signal.SIGTERM)
    with grpc.insecure_channel(proc.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                st = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError:
                break
            if st == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"{proc.label} did not start shutting down")
    time.sleep(0.5)  # NOT_SERVING comes just before the gRPC server's own stop


def test_a_call_a_stopping_replica_cancels_moves_its_session(fleet):
    """A call that reaches a replica whose shutdown has begun, before the client has read the
    replica's GOAWAY, is cancelled by gRPC there (CANCELLED; no handler ran): the session moves
    and replays as after UNAVAILABLE, and the texts are the local ones. A proxy holds the
    replica's replies, so the call is sent in that window every time (a Kubernetes scale-down hit
    it by chance under load)."""
    f, local = fleet
    want = [gen.greedy_ids(local, "tiny", ids, N) for ids in PROMPTS]
    # A long grace: b's open decode stream keeps the stopping server up while a's call lands.
    args = [*f.module_args, "--grace-s", "60"]
    extra = launcher.start_module(f.checkpoint, "attn-0", f.server_env(9), None, args)
    proxy = ex = None
    try:
        launcher.wait_healthy(extra.address, extra.proc, 300)
        proxy = _HeldReplies(extra.address)
        src = _Source({**f.endpoints, "attn-0": [proxy.address]})
        ex = RemoteExecutor(local.spec, src)
        a, b = (ex.open_session("tiny", [SamplingParams(max_new_tokens=N)]) for _ in PROMPTS)
        src.addresses["attn-0"] = f.endpoints["attn-0"]  # where they can move to
        outs = [[], [int(ex.prefill(b, [PROMPTS[1]]).tokens[0])]]

        def step(i, s):
            outs[i].append(int(ex.decode(s, np.array(outs[i][-1:])).tokens[0]))

        step(1, b)  # b's decode stream is open on the replica
        proxy.hold()
        _stop_and_wait_for_shutdown(extra)
        threading.Timer(1.0, proxy.let_through).start()
        outs[0].append(int(ex.prefill(a, [PROMPTS[0]]).tokens[0]))  # a new call: cancelled
        assert ex.moves == {("attn-0", "CANCELLED"): 1}
        for i, s in enumerate((a, b)):
            while len(outs[i]) < N:
                step(i, s)
            assert ex._sessions[s.id]["attn-0"].replica.address != proxy.address
            ex.close_session(s)
        assert ex.moves["attn-0", "UNAVAILABLE"] == 1  # b: its next step on the open stream
    finally:
        if ex is not None:
            ex.close()
        if proxy is not None:
            proxy.close()
        extra.kill()
    for out, w in zip(outs, want):
        np.testing.assert_array_equal(np.array(out), w)


def test_a_stopping_gateway_lets_its_generations_finish_within_its_grace(fleet):
    """SIGTERM mid-stream: with --grace-s 60 the generation streams to its end and the gateway
    exits right after it; with --grace-s 0 the stream is cut (UNAVAILABLE), and the stopping
    gateway closes the cut generation's sessions (the module servers free their rows now, not
    at their TTL)."""
    f, local = fleet
    sessions = lambda: {  # noqa: E731
        p.address: stub(p.address).Describe(module_pb2.DescribeRequest(), timeout=10).sessions
        for ps in f.servers.values()
        for p in ps
    }
    before = sessions()
    n = 200
    want = gen.generate(local, "tiny", [PROMPT], ByteTokenizer(), SamplingParams(max_new_tokens=n))
    req = gateway_pb2.GenerateRequest(
        pathway="tiny", prompt=PROMPT, sampling=gateway_pb2.SamplingOptions(max_new_tokens=n)
    )
    gateways = {
        g: launcher.start_gateway(f.checkpoint, f.endpoints, extra_args=["--grace-s", str(g)])
        for g in (60, 0)
    }
    try:
        launcher.wait_all_healthy(list(gateways.values()), 120)
        for grace, gw in gateways.items():
            with grpc.insecure_channel(gw.address) as ch:
                events = gateway_pb2_grpc.GatewayServiceStub(ch).Generate(req, timeout=120)
                got = [next(events)]
                gw.proc.send_signal(signal.SIGTERM)
                try:
                    got += list(events)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
            t_end = time.monotonic()
            gw.proc.wait(30)
            if grace:
                assert code == grpc.StatusCode.OK
                assert [e.token_id for e in got] == want[0].token_ids
                assert gw.proc.returncode == 0
                assert time.monotonic() - t_end < 10  # not the whole grace
            else:
                assert code == grpc.StatusCode.UNAVAILABLE
                assert len(got) < n
            end = time.monotonic() + 10  # a step still running on a server frees its rows after
            while (now := sessions()) != before and time.monotonic() < end:
                time.sleep(0.2)
            assert now == before, (grace, gw.proc.returncode, gw.tail(40))
    finally:
        launcher.stop_all(list(gateways.values()))


def test_a_client_call_a_stopping_gateway_cancels_is_retried_on_another(fleet):
    """A rollout: two gateways behind one address (a proxy standing for their Service). A call
    that reaches the first after its shutdown began is cancelled there; the client's retry policy
    sends it again, now to the second, and the text is the local one. The first gateway's own
    stream in flight finishes during its grace."""
    f, local = fleet
    gateways = [
        launcher.start_gateway(f.checkpoint, f.endpoints, extra_args=["--grace-s", "60"])
        for _ in range(2)
    ]
    proxy = None
    try:
        launcher.wait_all_healthy(gateways, 120)
        proxy = _HeldReplies(gateways[0].address)
        with client.Client(proxy.address, tls=transport.TLSConfig.plaintext()) as c:
            assert c.complete(PROMPT, max_tokens=2).text  # connected to the first gateway
            long = c.generate(PROMPT, max_tokens=120)  # held in flight there while it stops
            first = [next(long)]
            proxy.hold()
            _stop_and_wait_for_shutdown(gateways[0])
            proxy.target = gateways[1].address
            threading.Timer(1.0, proxy.let_through).start()
            got = c.complete(PROMPT, max_tokens=N)  # cancelled by the first, then retried
            rest = first + list(long)
        params = SamplingParams(max_new_tokens=N)
        assert got.text == gen.generate(local, "tiny", [PROMPT], ByteTokenizer(), params)[0].text
        params = SamplingParams(max_new_tokens=120)
        want = gen.generate(local, "tiny", [PROMPT], ByteTokenizer(), params)[0]
        assert [t.token_id for t in rest if t.token_id >= 0] == want.token_ids
        gateways[0].proc.wait(30)
        assert gateways[0].proc.returncode == 0
    finally:
        if proxy is not None:
            proxy.close()
        launcher.stop_all(gateways)


def _gateway_moves(f) -> collections.Counter:
    """The gateway's session moves so far, by (hop, status), from its /metrics."""
    with urllib.request.urlopen(f.metrics_urls["gateway"], timeout=10) as r:
        families = text_string_to_metric_families(r.read().decode())
        return collections.Counter(
            {
                (s.labels["hop"], s.labels["code"]): s.value
                for m in families
                for s in m.samples
                if s.name == "pathways_gateway_session_moves_total"
            }
        )


def test_killing_a_replica_under_a_gateway_stream_gives_the_same_text(fleet):
    f, local = fleet
    n = 200  # long enough that the gateway is still generating when the replica dies
    params = SamplingParams(max_new_tokens=n)
    want = gen.generate(local, "tiny", [PROMPT], ByteTokenizer(), params)[0]
    gw = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(f.gateway.address))
    req = gateway_pb2.GenerateRequest(
        pathway="tiny", prompt=PROMPT, sampling=gateway_pb2.SamplingOptions(max_new_tokens=n)
    )
    moves_before = _gateway_moves(f)
    events = gw.Generate(req, timeout=120)
    got = [next(events)]
    holders = [
        p
        for p in f.servers["attn-1"]
        if stub(p.address).Describe(module_pb2.DescribeRequest(), timeout=10).sessions
    ]
    assert len(holders) == 1
    holders[0].kill()
    got += list(events)
    assert [e.token_id for e in got] == want.token_ids
    assert "".join(e.text for e in got) == want.text
    # The gateway counts the move (its /metrics), by hop and the status that caused it.
    assert _gateway_moves(f) - moves_before == collections.Counter({("attn-1", "UNAVAILABLE"): 1})


def test_killing_a_replica_mid_generation_gives_the_same_text(fleet):
    f, local = fleet
    ids = list(PROMPT.encode())
    want = gen.greedy_ids(local, "tiny", ids, N)
    ex = RemoteExecutor(local.spec, f.endpoints)
    session = ex.open_session("tiny", [SamplingParams(max_new_tokens=N)])
    try:
        out = [int(ex.prefill(session, [ids]).tokens[0])]
        for _ in range(N // 2):
            out.append(int(ex.decode(session, np.array(out[-1:])).tokens[0]))
        holder = ex._sessions[session.id]["attn-0"].replica.address
        victim = next(p for p in f.servers["attn-0"] if p.address == holder)
        victim.kill()
        while len(out) < N:
            out.append(int(ex.decode(session, np.array(out[-1:])).tokens[0]))
        assert ex._sessions[session.id]["attn-0"].replica.address != holder
    finally:
        ex.close_session(session)
        ex.close()
    np.testing.assert_array_equal(np.array(out), want)


def test_a_gateway_without_some_module_refuses_only_the_pathways_needing_it(fleet):
    f, local = fleet
    from pathways.serving.gateway import GatewayServer

    endpoints = {m: a for m, a in f.endpoints.items() if m != "attn-1"}
    gateway = GatewayServer(local.spec, ByteTokenizer(), endpoints)
    gateway.start()
    try:
        gw = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(f"127.0.0.1:{gateway.port}"))
        names = [p.name for p in gw.ListPathways(gateway_pb2.ListPathwaysRequest()).pathways]
        assert names == ["tiny-shallow"]
        with pytest.raises(grpc.RpcError) as e:
            list(gw.Generate(gateway_pb2.GenerateRequest(pathway="tiny", prompt="x"), timeout=10))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'tiny'" in e.value.details()
        req = gateway_pb2.GenerateRequest(
            pathway="tiny-shallow",
            prompt="x",
            sampling=gateway_pb2.SamplingOptions(max_new_tokens=3),
        )
        assert len(list(gw.Generate(req, timeout=30))) == 3
    finally:
        gateway.stop(0)
