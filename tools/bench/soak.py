"""Soak of a local deployment (issue 17): N concurrent gateway clients for a fixed time, with one
replica killed and restarted midway.

A secured `LocalDeployment` (what `pathways up` runs: mutual TLS, API keys; no coordinator) of a
random checkpoint of examples/tiny.yaml with two replicas of attn-0. Each client (a thread) loops
greedy generations of a prompt of its own through GatewayService.Generate and compares every
text with the local executor's (computed first, in this process, from the same checkpoint); a
failed call or a different text is counted. At half time one attn-0 replica is SIGKILLed and
restarted on its port. Every 10 s the resident memory of each process is sampled; growth is
measured from the first sample after the warm-up. Prints a summary, writes JSON and a plot.

    PYTHONPATH=libs:.:build/gen python -m tools.bench.soak --clients 32 --seconds 600
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from pathways import certs, transport
from pathways import checkpoint as ckpt
from pathways import generate as gen
from pathways.deploy.launcher import Process, start_module, wait_healthy
from pathways.deploy.local import LocalDeployment
from pathways.executor.local import LocalExecutor
from pathways.sampling import SamplingParams
from pathways.serving import auth
from pathways.serving.testing import make_checkpoint
from pathways.tokenizers import ByteTokenizer
from pathways.v1 import gateway_pb2, gateway_pb2_grpc
from tools.bench.common import dated_path, write_json

TOKENS = 16
PROMPTS = [f"def f{i}(x):\n    return " for i in range(8)] + ["import ", "class A:", "# "]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def expected(directory: Path) -> dict[str, str]:
    spec, _ = ckpt.load_spec(directory)
    ex = LocalExecutor(spec)
    for m in spec.modules:
        ex.set_state(m, ckpt.load_module(directory, m, ex.state(m)))
    params = SamplingParams(max_new_tokens=TOKENS)
    return {p: gen.generate(ex, "tiny", [p], ByteTokenizer(), params)[0].text for p in PROMPTS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--warmup", type=float, default=60, help="seconds before RSS growth counts")
    ap.add_argument("--out", default="tools/bench/results")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    make_checkpoint(work / "ckpt")
    want = expected(work / "ckpt")
    home = work / "home"
    dep = LocalDeployment(
        work / "ckpt",
        replicas={"attn-0": 2},
        coordinator=False,
        secure_dir=home,
        module_args=["--max-slots", str(args.clients + 8)],
        log_dir=work / "logs",
        training=False,
    )
    dep.start()
    tls = transport.TLSConfig.from_dir(dep.client_tls_dir)
    md = auth.client_metadata(dep.api_key_file.read_text().strip())
    stop = threading.Event()
    lock = threading.Lock()
    latencies: list[tuple[float, float]] = []  # (time since start, seconds)
    failures: list[str] = []
    wrong: list[str] = []
    t0 = time.monotonic()

    def client(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        req = gateway_pb2.GenerateRequest(
            pathway="tiny",
            prompt=prompt,
            sampling=gateway_pb2.SamplingOptions(max_new_tokens=TOKENS),
        )
        with transport.channel(dep.gateway, tls=tls) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            while not stop.is_set():
                start = time.monotonic()
                try:
                    text = "".join(r.text for r in stub.Generate(req, 120, metadata=md))
                except grpc.RpcError as e:
                    with lock:
                        failures.append(f"{time.monotonic() - t0:.0f}s {e.code().name}")
                    continue
                with lock:
                    latencies.append((start - t0, time.monotonic() - start))
                    if text != want[prompt]:
                        wrong.append(f"{prompt!r}: {text!r} != {want[prompt]!r}")

    def processes() -> dict[str, int]:
        procs = {p.name: p.proc.pid for ps in dep.fleet.servers.values() for p in ps}
        procs["gateway"] = dep.fleet.gateway.proc.pid
        return procs

    samples: list[dict] = []
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    killed_at = restarted_at = None
    try:
        while (now := time.monotonic() - t0) < args.seconds:
            samples.append({"t": round(now, 1), **{n: rss_mb(p) for n, p in processes().items()}})
            if killed_at is None and now >= args.seconds / 2:
                victim: Process = dep.fleet.servers["attn-0"][1]
                victim.kill()
                killed_at = time.monotonic() - t0
                # A new server on the same port: the gateway's replica comes back.
                new = start_module(
                    dep.checkpoint,
                    "attn-0",
                    dep.fleet.server_env(5),
                    log=dep.log,
                    extra_args=[*dep.module_args, "--port", str(victim.port)],
                    replica=1,
                    tls=dep.identities.tls(certs.module_identity("attn-0")),
                )
                new.port, new.address = victim.port, victim.address  # --port given last wins
                dep.fleet.servers["attn-0"][1] = new
                wait_healthy(victim.address, new, 300, tls=dep.fleet.client_tls)
                restarted_at = time.monotonic() - t0
            time.sleep(10)
    finally:
        stop.set()
        for t in threads:
            t.join(180)
        dep.stop()
    lat = sorted(s for _, s in latencies)
    after = [s for s in samples if s["t"] >= args.warmup]
    growth = {}
    for name in processes_names(samples):
        series = [s[name] for s in after if s.get(name)]
        if len(series) >= 2:
            growth[name] = round(100 * (max(series[1:]) - series[0]) / series[0], 1)
    result = {
        "clients": args.clients,
        "seconds": args.seconds,
        "generations": len(lat),
        "failed": len(failures),
        "failures": failures[:50],
        "wrong": len(wrong),
        "wrong_examples": wrong[:5],
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3) if lat else None,
        "killed_at_s": round(killed_at, 1) if killed_at else None,
        "restarted_at_s": round(restarted_at, 1) if restarted_at else None,
        "rss_growth_pct_after_warmup": growth,
        "rss_mb": samples,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": os.getloadavg(),
        "command": "python -m tools.bench.soak " + " ".join(argv or sys.argv[1:]),
    }
    path = dated_path(args.out, "soak")
    summary = {k: v for k, v in result.items() if k != "rss_mb"}
    write_json(path, "soak", [summary], rss_mb=samples)
    plot(samples, killed_at, path.with_suffix(".png"))
    print({k: v for k, v in result.items() if k not in ("rss_mb", "failures")})
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0 if not failures and not wrong else 1


def processes_names(samples: list[dict]) -> list[str]:
    return sorted({k for s in samples for k in s if k != "t"})


def plot(samples: list[dict], killed_at: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in processes_names(samples):
        pts = [(s["t"], s[name]) for s in samples if s.get(name)]
        ax.plot([t for t, _ in pts], [v for _, v in pts], label=name)
    if killed_at is not None:
        ax.axvline(killed_at, color="k", linestyle="--", linewidth=0.8, label="attn-0.1 killed")
    ax.set_xlabel("seconds")
    ax.set_ylabel("resident memory (MB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
