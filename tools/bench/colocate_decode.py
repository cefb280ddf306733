"""Decode through module servers: one server per module against co-located modules (one server
hosting consecutive modules, one program per step), and the local executor, in the same run.

Each layout is a set of module servers started at once (`Fleet`, as `pathways up --colocate`
does); the layouts and the local executor alternate round by round, so drift in the machine's
load hits all alike. Prints a table and writes JSON: single-session tokens/s (median of
--rounds), each layout's ratio to one server per module and to local, and aggregate tokens/s of
--sessions concurrent sessions.

    PYTHONPATH=libs:.:build/gen python -m tools.bench.colocate_decode \
        --spec examples/gpt2-small.yaml --json tools/bench/results/colocate_decode_DATE.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile

import numpy as np

from pathways import cpu
from pathways import spec as spec_lib
from pathways.deploy import launcher
from pathways.executor.remote import RemoteExecutor
from pathways.serving import testing
from tools.bench.common import write_json
from tools.bench.remote_decode import concurrent_run, decode_run


def layouts(chain: list[str]) -> dict[str, list[str]]:
    """Layout name -> its servers: every module alone, the modules between the first and the
    last co-located, and the whole pathway on one server."""
    out = {"per-module": list(chain)}
    if len(chain) > 3:
        out["middle co-located"] = [chain[0], ",".join(chain[1:-1]), chain[-1]]
    out["whole pathway"] = [",".join(chain)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="examples/tiny.yaml")
    p.add_argument("--pathway", default=None)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians reported)")
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions, the last row")
    p.add_argument("--wire", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="XLA threads of every server and of the local executor (default: all the CPUs, "
        "as Fleet gives them)",
    )
    p.add_argument(
        "--kv-cache-mb",
        type=float,
        default=1024.0,
        help="KV cache budget per server (256, the servers' default, holds 7 sessions of GPT-2 "
        "small's 6 layers; the whole pathway on one server needs ~600 for 8)",
    )
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)
    for name in ("rounds", "sessions", "tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    spec0 = spec_lib.load(args.spec)
    pathway = args.pathway or spec0.default_pathway
    chain = list(spec0.pathway(pathway).modules)
    threads = args.threads or launcher.cpus()
    cpu.limit_threads(threads)  # before this process's first computation
    res = {"spec": args.spec, "pathway": pathway, "tokens": args.tokens, "threads": threads}
    res.update(wire=args.wire, sessions=args.sessions, layouts={})
    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
        local = testing.make_checkpoint(d, args.spec)
        prompt = list(np.random.default_rng(0).integers(0, 200, args.prompt_len))
        execs = {}
        for name, servers in layouts(chain).items():
            fleet = launcher.Fleet(
                d,
                servers,
                gateway=False,
                env={"PATHWAYS_CPU_THREADS": str(threads)},
                module_args=[
                    *("--max-batch", str(args.sessions)),
                    *("--kv-cache-mb", str(args.kv_cache_mb)),
                ],
            )
            stack.enter_context(fleet)
            ex = RemoteExecutor(local.spec, fleet.endpoints, wire_dtype=args.wire)
            stack.callback(ex.close)
            execs[name] = ex
            res["layouts"][name] = {"servers": servers, "hops": len(servers), "runs": []}
            print(f"{name}: {len(servers)} server(s) up", file=sys.stderr, flush=True)
        res["local_runs"] = []
        for r in range(args.rounds):
            order = list(execs) if r % 2 == 0 else list(reversed(execs))
            res["local_runs"].append(decode_run(local, pathway, prompt, args.tokens))
            for name in order:
                rate = decode_run(execs[name], pathway, prompt, args.tokens)
                res["layouts"][name]["runs"].append(rate)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        base = res["layouts"]["per-module"]["runs"]
        for name, ex in execs.items():
            lay = res["layouts"][name]
            lay["tok_s"] = float(np.median(lay["runs"]))
            lay["vs_per_module"] = float(np.median(np.array(lay["runs"]) / np.array(base)))
            lay["vs_local"] = float(np.median(np.array(lay["runs"]) / np.array(res["local_runs"])))
            lay["concurrent_tok_s"] = concurrent_run(
                ex, pathway, prompt, args.tokens, args.sessions
            )
        res["local_tok_s"] = float(np.median(res["local_runs"]))
    print_table(res)
    if args.json:
        write_json(args.json, "colocate_decode", [res])
    return 0


def print_table(res) -> None:
    print(
        f"\n{res['spec']} pathway {res['pathway']}, {res['tokens']} decode tokens, wire "
        f"{res['wire']}, {res['threads']} XLA thread(s) per server and locally; local "
        f"{res['local_tok_s']:.1f} tok/s (median)"
    )
    print(
        f"| layout | servers | 1 session tok/s (median) | vs per-module | vs local | "
        f"{res['sessions']} sessions tok/s |"
    )
    print("|---|---|---|---|---|---|")
    for name, lay in res["layouts"].items():
        print(
            f"| {name} | {' / '.join(lay['servers'])} | {lay['tok_s']:.1f} | "
            f"{lay['vs_per_module']:.2f} | {lay['vs_local']:.2f} | {lay['concurrent_tok_s']:.1f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
