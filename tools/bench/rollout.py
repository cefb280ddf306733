"""A gateway rollout under load: clients loop greedy generations through one address (a TCP
forwarder standing for the gateway's Service) while the gateway behind it is replaced: midway the
first gateway gets SIGTERM and new connections go to a second one, as the Service's endpoints
change. Counts failed calls and texts that differ from the local executor's, for two settings
measured in the same run on the same module servers:

  now       the gateways' --grace-s 60 (the rendered manifests') and pathways.client's retry
            policy (RETRY_POLICY)
  baseline  --grace-s 5 (the gateway's fixed grace before) and no retries
  grace     --grace-s 60 alone, no retries (which of the two changes does what)

Most clients run short generations; `--long` of them run long ones (`--long-tokens`), and the
first gateway is stopped just after one of those began, so a stream has most of its run ahead. Whether one outlasts the old 5 s grace depends on
the model and the load: the tiny spec's take about 2 s here; GPT-2 small's (random weights,
`--spec examples/gpt2-small.yaml`) take longer.

    PYTHONPATH=libs:.:build/gen python -m tools.bench.rollout --clients 16 --long 4 --seconds 40
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from pathways import checkpoint as ckpt
from pathways import client, transport
from pathways import generate as gen
from pathways.deploy import launcher
from pathways.executor.local import LocalExecutor
from pathways.sampling import SamplingParams
from pathways.serving.testing import make_checkpoint
from pathways.tokenizers import ByteTokenizer
from tools.bench.common import print_table, save_record

SHORT = 16
PROMPTS = [f"def f{i}(x):\n    return " for i in range(8)] + ["import ", "class A:", "# "]
NO_RETRIES = (("grpc.enable_retries", 0),)
MODES = {
    "baseline": (5, NO_RETRIES),
    "grace": (60, NO_RETRIES),  # the longer grace alone
    "now": (60, ()),
}


class Forwarder:
    """TCP forwarding from `address` to `target` (settable: new connections go to the new one;
    open connections stay where they are, as with a Service)."""

    def __init__(self, target: str):
        self.target = target
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            host, port = self.target.rsplit(":", 1)
            try:
                up = socket.create_connection((host, int(port)))
            except OSError:
                conn.close()
                continue
            threading.Thread(target=self._pump, args=(conn, up), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        with a, b:
            while True:
                for s in select.select(list(peers), [], [], 1.0)[0]:
                    try:
                        data = s.recv(65536)
                        if not data:
                            return
                        peers[s].sendall(data)
                    except OSError:
                        return


def expected(directory: Path, lengths: tuple[int, ...]) -> dict[tuple[str, int], list[int]]:
    """The local executor's greedy token ids for each prompt and length."""
    spec, _ = ckpt.load_spec(directory)
    ex = LocalExecutor(spec)
    for m in spec.modules:
        ex.set_state(m, ckpt.load_module(directory, m, ex.state(m)))
    out = {}
    for p in PROMPTS:
        for n in lengths:
            params = SamplingParams(max_new_tokens=n)
            out[p, n] = gen.generate(ex, spec.default_pathway, [p], ByteTokenizer(), params)[0]
    return {k: list(v.token_ids) for k, v in out.items()}


def rollout(fleet, want, mode: str, args) -> dict:
    grace, options = MODES[mode]
    extra = ["--grace-s", str(grace)]
    gws = [launcher.start_gateway(fleet.checkpoint, fleet.endpoints, extra_args=extra)]
    gws.append(launcher.start_gateway(fleet.checkpoint, fleet.endpoints, extra_args=extra))
    launcher.wait_all_healthy(gws, 120)
    fwd = Forwarder(gws[0].address)
    stop, lock = threading.Event(), threading.Lock()
    done = {"short": 0, "long": 0}
    failed: list[str] = []
    wrong = 0
    latencies: list[float] = []  # short generations
    long_s: list[float] = []
    calls: list[tuple[float, float]] = []  # (start, end) of each long call, since t0
    running: dict[int, float] = {}  # long client -> when its current call started
    t0 = time.monotonic()

    def loop(i: int) -> None:
        nonlocal wrong
        n = args.long_tokens if i < args.long else SHORT
        prompt = PROMPTS[i % len(PROMPTS)]
        tls = transport.TLSConfig.plaintext()
        with client.Client(fwd.address, tls=tls, options=options, timeout=120) as c:
            while not stop.is_set():
                start = time.monotonic()
                if i < args.long:
                    running[i] = start
                try:
                    ids = c.complete(prompt, max_tokens=n).token_ids
                except client.GatewayError as e:
                    with lock:
                        failed.append(f"{time.monotonic() - t0:.1f}s {e.code.name} {e.details}")
                    if e.retry_after_s:  # servers full: wait as told (none should be here)
                        time.sleep(e.retry_after_s)
                    continue
                with lock:
                    done["long" if i < args.long else "short"] += 1
                    wrong += list(ids) != want[prompt, n]
                    (long_s if i < args.long else latencies).append(time.monotonic() - start)
                    if i < args.long:
                        calls.append((start - t0, time.monotonic() - t0))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    try:
        time.sleep(args.seconds / 2)
        # Stop it just after a long generation began (up to 30 s more): one stream then has
        # most of its run ahead of it, more than the old 5 s grace for the models it is
        # meant for (check long_in_flight_at_stop).
        end = time.monotonic() + 30
        while (
            time.monotonic() < end
            and args.long
            and not any(0.3 <= time.monotonic() - t <= 1.0 for t in list(running.values()))
        ):
            time.sleep(0.02)
        gws[0].proc.send_signal(15)
        t_term = time.monotonic()
        time.sleep(0.05)  # endpoints follow the pod's termination a moment later
        fwd.target = gws[1].address
        gws[0].proc.wait(120)
        drained_s = time.monotonic() - t_term
        time.sleep(max(0.0, args.seconds - (time.monotonic() - t0)))
    finally:
        stop.set()
        for t in threads:
            t.join(180)
        fwd.close()
        launcher.stop_all(gws)
    lat = sorted(latencies)
    return {
        "mode": mode,
        "spec": args.spec,
        "long_tokens": args.long_tokens,
        "grace_s": grace,
        "retries": not options,
        "short_ok": done["short"],
        "long_ok": done["long"],
        "failed": len(failed),
        "failed_by_code": dict(collections.Counter(f.split()[1] for f in failed)),
        "wrong": wrong,
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3) if lat else None,
        "long_p50_s": round(statistics.median(long_s), 2) if long_s else None,
        # Long generations in flight when the first gateway got SIGTERM, and how long they
        # went on after it (each finished: the failures say otherwise).
        "long_in_flight_at_stop": [
            round(e - (t_term - t0), 1) for b, e in calls if b < t_term - t0 < e
        ],
        "old_gateway_exit_s": round(drained_s, 1),
        "failures": sorted(set(f.split(" ", 1)[1] for f in failed))[:10],  # code and message
        "first_failure_s": float(failed[0].split("s ", 1)[0]) if failed else None,
        "last_failure_s": float(failed[-1].split("s ", 1)[0]) if failed else None,
        "stop_at_s": round(t_term - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--spec", default="examples/tiny.yaml")
    ap.add_argument("--long", type=int, default=4, help="clients running long generations")
    ap.add_argument("--long-tokens", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=40, help="per setting; the stop is midway")
    ap.add_argument("--modes", default="baseline,grace,now")
    ap.add_argument("--warmup", type=float, default=20, help="seconds of load first, not counted")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        ap.error(f"unknown mode(s) {unknown}; choose from {sorted(MODES)}")
    if not 0 <= args.long <= args.clients:
        ap.error(f"--long must be in [0, --clients]; got {args.long}")
    work = Path(tempfile.mkdtemp(prefix="rollout-"))
    make_checkpoint(work / "ckpt", args.spec)
    want = expected(work / "ckpt", (SHORT, args.long_tokens))
    spec, _ = ckpt.load_spec(work / "ckpt")
    fleet = launcher.Fleet(
        str(work / "ckpt"),
        list(spec.modules),
        gateway=False,
        # Room for every client's session on both gateways' generations at once.
        module_args=["--max-slots", str(2 * args.clients + 8), "--kv-cache-mb", "1536"],
        log=work / "logs",
    )
    rows = []
    with fleet:
        # The same load once first, not counted: the servers compile their batch shapes (the
        # first setting measured would pay for it).
        rollout(fleet, want, "now", argparse.Namespace(**{**vars(args), "seconds": args.warmup}))
        for mode in modes:
            rows.append(rollout(fleet, want, mode, args))
            print(f"{mode}: failures {rows[-1]['failures']}", flush=True)
    print_table(
        rows,
        [
            ("mode", "setting", "s"),
            ("grace_s", "grace s", "d"),
            ("short_ok", "short ok", "d"),
            ("long_ok", "long ok", "d"),
            ("failed", "failed", "d"),
            ("wrong", "wrong tokens", "d"),
            ("p50_s", "short p50 s", ".2f"),
            ("p99_s", "short p99 s", ".2f"),
            ("long_p50_s", "long p50 s", ".1f"),
            ("old_gateway_exit_s", "old gateway exit s", ".1f"),
        ],
    )
    save_record(
        args.out,
        "rollout",
        rows,
        command="python -m tools.bench.rollout " + " ".join(argv or sys.argv[1:]),
        load_average=os.getloadavg(),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
