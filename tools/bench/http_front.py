"""Added latency of the OpenAI-compatible HTTP front over the gRPC gateway it talks to.

One secured local deployment (`up`'s processes: module servers, gateway, HTTP front; mutual TLS,
API keys) of a randomly initialised checkpoint of --spec. Each round runs, for 1 and for 8
concurrent streams, the same greedy generation once through the gateway (pathways.client over
gRPC) and once through the HTTP front (streamed /v1/completions, server-sent events, read with
httpx), the order alternating between rounds. Per stream: time to first token (request sent to
first token received) and per-token time after it; a round's value is the median over its
streams, the result the median over rounds. Prints a table and writes JSON.

    PYTHONPATH=libs:.:build/gen python -m tools.bench.http_front --spec examples/gpt2-small.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from pathways import certs, client, transport
from pathways.deploy.local import LocalDeployment
from pathways.serving.testing import make_checkpoint
from tools.bench.common import dated_path, median, print_table, write_json

PROMPT = "def fibonacci(n):\n    "


# Both paths time the same events: one per generated token (the HTTP front sends an event for
# each, its text "" where a token completes no printable character).


def _stream_grpc(c: client.Client, pathway: str, n: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = last = None
    count = 0
    for tok in c.generate(PROMPT, pathway=pathway, max_tokens=n, temperature=0.0):
        if tok.token_id < 0:
            continue
        last = time.perf_counter()
        first = first or last
        count += 1
    return first - t0, (last - first) / max(1, count - 1), count


def _stream_http(
    h: httpx.Client, url: str, key: str, pathway: str, n: int
) -> tuple[float, float, int]:
    body = {"model": pathway, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = last = None
    count = 0
    with h.stream(
        "POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("finish_reason"):
                continue
            last = time.perf_counter()
            first = first or last
            count += 1
    return first - t0, (last - first) / max(1, count - 1), count


def _concurrent(fn, k: int) -> list[tuple[float, float, int]]:
    out: list = [None] * k
    errors: list = []
    barrier = threading.Barrier(k)

    def run(i):
        try:
            barrier.wait()
            out[i] = fn()
        except Exception as e:  # reported after the round
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="http_front", description=__doc__)
    p.add_argument("--spec", default="examples/tiny.yaml")
    p.add_argument("--pathway", default=None, help="default: the spec's first")
    p.add_argument("--tokens", type=int, default=32, help="tokens per stream")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    p.add_argument(
        "--kv-cache-mb", type=float, default=1024.0, help="KV-cache pool per attention server"
    )
    p.add_argument("--out", default="tools/bench/results")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.tokens < 2:
        p.error("--rounds must be >= 1 and --tokens >= 2")
    work = Path(tempfile.mkdtemp(prefix="pathways-bench-http-"))
    ckpt, home = work / "ckpt", work / "home"
    print(f"random checkpoint of {args.spec} in {ckpt} ...", file=sys.stderr)
    ex = make_checkpoint(ckpt, args.spec)
    pathway = args.pathway or ex.spec.default_pathway
    del ex
    os.environ["PATHWAYS_HOME"] = str(home)
    slots = str(max(args.streams) * 2)
    dep = LocalDeployment(
        ckpt,
        coordinator=False,
        secure_dir=home,
        http_front=True,
        log_dir=work / "logs",
        module_args=["--max-slots", slots, "--kv-cache-mb", str(args.kv_cache_mb)],
    )
    dep.start()
    try:
        key = (home / "client.key").read_text().strip()
        tls = transport.TLSConfig.from_dir(home / "tls" / certs.CLIENT)
        grpc_client = client.Client(dep.gateway, api_key=key, tls=tls)
        http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=32))
        paths = {
            "grpc": lambda: _stream_grpc(grpc_client, pathway, args.tokens),
            "http": lambda: _stream_http(http, dep.http.url, key, pathway, args.tokens),
        }
        for k in args.streams:  # compile every batch shape first; not timed
            for fn in paths.values():
                _concurrent(fn, k)
        raw: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(args.rounds):
            order = ["grpc", "http"] if rnd % 2 == 0 else ["http", "grpc"]
            for k in args.streams:
                for name in order:
                    res = _concurrent(paths[name], k)
                    raw.setdefault((name, k), []).append(
                        {
                            "ttft_ms": median([r[0] for r in res]) * 1e3,
                            "per_token_ms": median([r[1] for r in res]) * 1e3,
                            "events": median([r[2] for r in res]),
                        }
                    )
                    print(f"round {rnd} {name} x{k}: {raw[(name, k)][-1]}", file=sys.stderr)
        rows = []
        for k in args.streams:
            g, h = raw[("grpc", k)], raw[("http", k)]
            row = {"streams": k}
            for m in ("ttft_ms", "per_token_ms"):
                row[f"grpc_{m}"] = median([r[m] for r in g])
                row[f"http_{m}"] = median([r[m] for r in h])
                # Paired by round (same round, adjacent runs), then the median of the differences.
                row[f"added_{m}"] = median([b[m] - a[m] for a, b in zip(g, h)])
            row["added_per_token_pct"] = 100 * row["added_per_token_ms"] / row["grpc_per_token_ms"]
            row["events"] = median([r["events"] for r in g + h])
            rows.append(row)
        print_table(
            rows,
            [
                ("streams", "streams", "d"),
                ("grpc_ttft_ms", "gRPC TTFT ms", ".1f"),
                ("http_ttft_ms", "HTTP TTFT ms", ".1f"),
                ("added_ttft_ms", "added TTFT ms", "+.1f"),
                ("grpc_per_token_ms", "gRPC ms/tok", ".2f"),
                ("http_per_token_ms", "HTTP ms/tok", ".2f"),
                ("added_per_token_ms", "added ms/tok", "+.2f"),
                ("added_per_token_pct", "added %", "+.1f"),
                ("events", "events", ".0f"),
            ],
        )
        path = write_json(
            dated_path(args.out, "http_front"),
            "http_front",
            rows,
            spec=args.spec,
            pathway=pathway,
            tokens=args.tokens,
            rounds=args.rounds,
            prompt=PROMPT,
            raw={f"{n}x{k}": v for (n, k), v in raw.items()},
            command="python -m tools.bench.http_front " + " ".join(argv or sys.argv[1:]),
        )
        print(f"wrote {path}")
        grpc_client.close()
        http.close()
    finally:
        dep.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
