"""Soak of the HTTP front: N concurrent streaming clients for a fixed time on one deployment.

A secured local deployment (module servers, gateway, HTTP front) of a random checkpoint of
--spec with KV-cache room for --clients sessions per attention server. Each client (one asyncio
task, httpx) streams /v1/completions in a loop; a 429 is waited out (its Retry-After) and retried,
and counted; anything else that is not a complete stream ending in `data: [DONE]` is a failure.
Every 10 s the resident memory of each process is sampled. Prints a summary, writes JSON.

    PYTHONPATH=libs:.:build/gen python -m tools.bench.http_soak --clients 64 --seconds 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pathways.deploy.local import LocalDeployment
from pathways.serving.testing import make_checkpoint
from tools.bench.common import dated_path, write_json


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def client_loop(i, url, key, model, tokens, end, stats):
    rng = random.Random(i)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=120) as h:
        while time.monotonic() < end:
            body = {
                "model": model,
                "prompt": f"def f{rng.randrange(1000)}(x):",
                "max_tokens": rng.randint(tokens // 2, tokens),
                "temperature": 0.8,
                "seed": rng.randrange(2**31),
                "stream": True,
            }
            try:
                async with h.stream(
                    "POST", url + "/v1/completions", json=body, headers=headers
                ) as r:
                    if r.status_code == 429:
                        stats["retried_429"] += 1
                        await r.aread()
                        await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                        continue
                    if r.status_code != 200:
                        stats["failures"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]}")
                        continue
                    last, n = None, 0
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            last = line
                            if '"error"' in line:
                                break
                            n += 1
                    if last != "data: [DONE]":
                        stats["failures"].append(f"stream ended with {last!r}")
                        continue
                    stats["completed"] += 1
                    stats["events"] += n
            except httpx.HTTPError as e:
                stats["failures"].append(f"{type(e).__name__}: {e}")


async def soak(url, key, model, clients, seconds, tokens, pids, samples):
    stats = {"completed": 0, "retried_429": 0, "events": 0, "failures": []}
    end = time.monotonic() + seconds

    async def sampler():
        t0 = time.monotonic()
        while time.monotonic() < end:
            samples.append(
                {"t_s": round(time.monotonic() - t0, 1), **{n: rss_mb(p) for n, p in pids.items()}}
            )
            await asyncio.sleep(10)

    tasks = [client_loop(i, url, key, model, tokens, end, stats) for i in range(clients)]
    await asyncio.gather(sampler(), *tasks)
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="http_soak", description=__doc__)
    p.add_argument("--spec", default="examples/tiny.yaml")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--tokens", type=int, default=24, help="max tokens per request (half to all)")
    p.add_argument("--out", default="tools/bench/results")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pathways-soak-"))
    ckpt, home = work / "ckpt", work / "home"
    ex = make_checkpoint(ckpt, args.spec)
    model = ex.spec.default_pathway
    del ex
    os.environ["PATHWAYS_HOME"] = str(home)
    dep = LocalDeployment(
        ckpt,
        coordinator=False,
        secure_dir=home,
        http_front=True,
        log_dir=work / "logs",
        module_args=["--max-slots", str(args.clients)],  # the KV budget: one slot per client
    )
    dep.start()
    try:
        key = (home / "client.key").read_text().strip()
        pids = {"http-front": dep.http.proc.pid, "gateway": dep.fleet.gateway.proc.pid}
        for m, procs in dep.fleet.servers.items():
            pids[m] = procs[0].proc.pid
        # Warm-up (compiles the batch shapes): a short soak, not counted.
        asyncio.run(soak(dep.http.url, key, model, args.clients, 20, args.tokens, pids, []))
        samples: list[dict] = []
        t0 = time.monotonic()
        stats = asyncio.run(
            soak(dep.http.url, key, model, args.clients, args.seconds, args.tokens, pids, samples)
        )
        wall = time.monotonic() - t0
        first, last = samples[0], samples[-1]
        memory = {
            n: {
                "first_mb": first[n],
                "last_mb": last[n],
                "max_mb": max(s[n] for s in samples if s[n] is not None),
            }
            for n in pids
        }
        row = {
            "clients": args.clients,
            "seconds": round(wall, 1),
            "completed": stats["completed"],
            "failed": len(stats["failures"]),
            "retried_429": stats["retried_429"],
            "events": stats["events"],
            "events_per_s": stats["events"] / wall,
        }
        print(json.dumps(row))
        for n, m in memory.items():
            print(
                f"  {n:<12} RSS {m['first_mb']:.0f} -> {m['last_mb']:.0f} MB (max {m['max_mb']:.0f})"
            )
        for f in stats["failures"][:10]:
            print("  failure:", f)
        path = write_json(
            dated_path(args.out, "http_soak"),
            "http_soak",
            [row],
            spec=args.spec,
            memory=memory,
            samples=samples,
            failures=stats["failures"][:50],
            command="python -m tools.bench.http_soak " + " ".join(argv or sys.argv[1:]),
        )
        print(f"wrote {path}")
    finally:
        dep.stop()
    return 0 if not stats["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
