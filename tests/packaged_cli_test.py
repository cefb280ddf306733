"""What users run: the packaged `pathways` PEX, from a directory outside the checkout, with a
minimal environment (PATH, HOME, a fresh PEX_ROOT). Every process it launches (module servers,
gateway, coordinator worker, broker) runs from that one file, so a dependency missing from any of
them fails here. Pants builds the PEX for this test (runtime_package_dependencies in BUILD).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pathways import generate as gen
from pathways import transport
from pathways.sampling import SamplingParams
from pathways.serving import testing
from pathways.tokenizers import ByteTokenizer
from pathways.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.slow
PEX = Path("tools.cli/pathways.pex")  # where Pants puts the package in the test's sandbox
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Runs the packaged CLI: cli(*argv, **popen_kwargs) -> CompletedProcess (or a Popen with
    background=True). One fresh PEX_ROOT for the file: the first call unpacks the PEX."""
    if not PEX.exists():
        pytest.skip(f"{PEX} is built by Pants: run ./pants test {Path(__file__).relative_to(ROOT)}")
    work = tmp_path_factory.mktemp("packaged")
    shutil.copy(PEX, work / "pathways.pex")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ["HOME"],
        "PEX_ROOT": str(work / "pex-root"),
        "PATHWAYS_HOME": str(work / "home"),  # where `up` records itself: this test's own
    }

    def run(*argv, background=False, timeout=300, **kw):
        cmd = [str(work / "pathways.pex"), *argv]
        if background:  # its own process group (killed whole if the test fails); output piped
            pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            return subprocess.Popen(cmd, cwd=work, env=env, start_new_session=True, **pipes)
        return subprocess.run(
            cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout, **kw
        )

    run.work = work
    return run


def _children(pid: int) -> str:
    return subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout.strip()


def _serving(address: str, tls: transport.TLSConfig) -> bool:
    with transport.channel(address, tls=tls) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return r.status == health_pb2.HealthCheckResponse.SERVING


def test_demo_trains_through_the_module_services_then_generates_and_stops(cli):
    proc = cli(
        "demo",
        "--out",
        "demo",
        "--steps",
        "20",
        "--max-tokens",
        "16",
        background=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    out = cli.work / "demo"
    assert stdout.startswith("def ")  # the generation, streamed from the gateway
    for line in ("loss ", "throughput ", "module time ", "on the wire ", "loss plot "):
        assert f"\n  {line}" in stdout, stdout
    assert (out / "checkpoint" / "loss.png").stat().st_size > 0
    losses = [
        json.loads(r)["loss"]
        for r in (out / "checkpoint" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.5, losses
    # Training went through every module server: each applied all 20 optimizer steps.
    for module in ("embed", "attn-0", "attn-1", "head"):
        log = (out / "logs" / f"{module}.log").read_text()
        assert "optimizer step applied (20 since start" in log, log[-2000:]
    # Every process the demo started is gone (servers, gateway, worker, broker).
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    assert str(cli.work) not in ps and str(out) not in ps


def test_up_serves_generates_trains_and_stops_cleanly(cli, tmp_path):
    local = testing.make_checkpoint(tmp_path / "ckpt")
    want = gen.generate(
        local, "tiny-shallow", ["def "], ByteTokenizer(), SamplingParams(max_new_tokens=12)
    )[0].text
    up = cli(
        "up",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--replicas",
        "attn-0=2",
        background=True,
    )
    try:
        line = up.stdout.readline()
        assert line.startswith("gateway 127.0.0.1:"), (line, up.stderr.read()[-3000:])
        address = line.split()[1]
        # The OpenAI-compatible HTTP front beside it (its dependencies are in the PEX too).
        http_line = up.stdout.readline()
        assert http_line.startswith("http http://127.0.0.1:"), http_line
        key = (cli.work / "home" / "client.key").read_text().strip()
        models = httpx.get(
            http_line.split()[1] + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        assert models.status_code == 200, models.text
        assert {m["id"] for m in models.json()["data"]} == {"tiny", "tiny-shallow"}
        state_file = cli.work / "home" / "deployment.json"
        state = json.loads(state_file.read_text())
        # The broker asks for a password; the state file that holds its URL is the owner's only.
        assert re.match(r"redis://:[\w-]{20,}@127\.0\.0\.1:\d+/0$", state["broker"])
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
        servers = [a for addrs in state["modules"].values() for a in addrs]
        # Secured by default: mutual TLS with the local user's certificate (the state file says
        # where); a plaintext client is refused.
        tls = transport.TLSConfig.from_dir(state["tls"])
        assert len(servers) == 5 and all(_serving(a, tls) for a in [address, *servers])
        with pytest.raises(grpc.RpcError) as refused:
            _serving(servers[0], transport.TLSConfig.plaintext())
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with transport.channel(address, tls=tls) as ch:  # the gateway asks for an API key
            with pytest.raises(grpc.RpcError) as no_key:
                gateway_pb2_grpc.GatewayServiceStub(ch).ListPathways(
                    gateway_pb2.ListPathwaysRequest(), timeout=10
                )
        assert no_key.value.code() == grpc.StatusCode.UNAUTHENTICATED

        out = cli(
            "generate",
            "--gateway",
            address,
            "--pathway",
            "tiny-shallow",
            "--prompt",
            "def ",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == "def " + want + "\n"
        bad = cli("generate", "--gateway", address, "--pathway", "nope", "--prompt", "x")
        assert bad.returncode == 2 and "NOT_FOUND" in bad.stderr and bad.stdout == ""

        # Training through the deployment's module services, under its coordinator. Jobs read
        # only under the deployment's roots (here: beside its checkpoint), so the user's spec is
        # there, as a user's own spec would be; one elsewhere is refused with the roots named.
        spec = tmp_path / "tiny.yaml"
        shutil.copy(ROOT / "examples/tiny.yaml", spec)
        run = tmp_path / "run"
        trained = cli(
            "train",
            "--remote",
            "--spec",
            str(spec),
            "--out",
            str(run),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--micro-batches",
            "2",
            "--max-data-mb",
            "0.2",
            "--eval-every",
            "2",
            "--save-every",
            "2",
        )
        assert trained.returncode == 0, trained.stderr
        assert "(services, 1f1b, 2 micro-batches)" in trained.stderr
        assert (run / "loss.png").exists() and (run / "train" / "meta.json").exists()
        jobs = cli("jobs", "list")
        assert jobs.returncode == 0 and "SUCCESS" in jobs.stdout and str(run) in jobs.stdout
        outside = cli(
            "train", "--remote", "--spec", str(ROOT / "examples/tiny.yaml"), "--out", str(run)
        )
        assert outside.returncode != 0 and "outside the allowed directories" in outside.stderr
        unknown = cli("jobs", "status", "no-such-job")
        assert unknown.returncode == 2 and "unknown job 'no-such-job'" in unknown.stderr
        listed = cli("pathways", "list")
        assert listed.returncode == 0 and re.search(
            r"tiny-shallow\s+embed -> attn-0", listed.stdout
        )
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=90)
        if code != 0:
            os.killpg(up.pid, signal.SIGKILL)
    assert code == 0, up.stderr.read()[-3000:]
    assert _children(up.pid) == ""  # no server left behind
    assert not (cli.work / "home" / "deployment.json").exists()


def test_a_process_dying_at_start_is_named_and_the_others_stopped(cli, tmp_path):
    testing.make_checkpoint(tmp_path / "ckpt")
    # A corrupt module: its server exits while loading; `up` must say which and why, then stop.
    head = tmp_path / "ckpt" / "modules" / "head"
    assert head.is_dir(), sorted(p.name for p in (tmp_path / "ckpt").rglob("*"))[:20]
    for f in head.rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    t0 = time.monotonic()
    up = cli("up", "--checkpoint", str(tmp_path / "ckpt"), "--no-coordinator", timeout=300)
    assert up.returncode != 0
    err = up.stderr
    assert "module server 'head' exited with code" in err, err[-3000:]
    assert "the end of its log" in err and "| " in err, err[-3000:]
    assert time.monotonic() - t0 < 240
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    assert str(tmp_path / "ckpt") not in ps  # the other servers were stopped
