"""A pathway larger than one process: examples/llama-1b.yaml (1.1 B parameters) through 10 module
servers, against the same weights in one process, for each weight storage.

For each --weights value (float32, bfloat16, int8), one after the other so that both sides fit
in this machine's memory: start every module as its own process (`launcher.Fleet`, as `pathways
up` does) and time it; record every process's resident memory (VmRSS) and peak (VmHWM) after a
greedy generation through them (`RemoteExecutor`); stop them; then the same generation in this
process (`LocalExecutor` with the same storage) and its memory. Greedy tokens of the two sides
are compared. Random weights (seeded), saved once as a float32 checkpoint.

    PYTHONPATH=libs:.:build/gen .venv/py312/bin/python -m tools.bench.big_pathway
    (each side generates twice, the first run compiling; --weights float32 to shorten)
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from pathways import checkpoint as ckpt
from pathways import cpu
from pathways import spec as spec_lib
from pathways.deploy import launcher
from pathways.executor.local import LocalExecutor
from pathways.executor.remote import RemoteExecutor
from pathways.sampling import SamplingParams
from pathways.serving import testing
from tools.bench.common import dated_path, print_table, write_json

ROOT = Path(__file__).resolve().parents[2]


def proc_memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def generate(ex, pathway: str, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    """Greedy: (tokens, prefill seconds, decode tokens per second)."""
    s = ex.open_session(pathway, [SamplingParams()])
    t0 = time.perf_counter()
    r = ex.prefill(s, [prompt])
    t1 = time.perf_counter()
    tokens = [int(r.tokens[0])]
    for _ in range(n - 1):
        r = ex.decode(s, r.tokens)
        tokens.append(int(r.tokens[0]))
    t2 = time.perf_counter()
    ex.close_session(s)
    return tokens, t1 - t0, (n - 1) / (t2 - t1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "examples/llama-1b.yaml"))
    p.add_argument("--weights", nargs="+", default=["float32", "bfloat16", "int8"])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16, help="generated tokens (greedy)")
    p.add_argument("--kv-cache-mb", type=float, default=64.0, help="per attention server")
    p.add_argument("--checkpoint", default=None, help="reuse this checkpoint of --spec")
    p.add_argument("--out", default=None, help="JSON record (default: a dated file in results/)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else dated_path(ROOT / "tools/bench/results", "big_pathway")
    spec = spec_lib.load(args.spec)
    pathway = spec.default_pathway
    chain = list(spec.pathway(pathway).modules)
    vocab = next(c.vocab_size for c in spec.modules.values() if hasattr(c, "vocab_size"))
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, vocab, args.prompt_len)]
    # Every module server gets the machine's cores split between them; this process, the same
    # share times the number of servers (all of them), so that both sides have the whole machine.
    threads = cpu.limit_threads(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.checkpoint
        if directory is None:
            directory = tmp
            t = time.perf_counter()
            params = testing.make_checkpoint(directory, args.spec, seed=0)
            params = sum(
                int(np.prod(x.shape)) for m in spec.modules for x in _leaves(params.state(m))
            )
            gc.collect()
            print(f"checkpoint: {params / 1e9:.2f} B parameters in {time.perf_counter() - t:.0f} s")
        for storage in args.weights:
            row = {"weights": storage, "processes": len(chain)}
            t = time.perf_counter()
            with launcher.Fleet(
                directory,
                chain,
                gateway=False,
                module_args=["--weights", storage, "--kv-cache-mb", str(args.kv_cache_mb)],
            ) as fleet:
                row["start_s"] = time.perf_counter() - t
                ex = RemoteExecutor(spec, fleet.endpoints)
                generate(ex, pathway, prompt, args.tokens)  # compiles every shape: not timed
                tokens, row["remote_prefill_s"], row["remote_tok_s"] = generate(
                    ex, pathway, prompt, args.tokens
                )
                ex.close()
                mem = {m: proc_memory(ps[0].proc.pid) for m, ps in fleet.servers.items() if ps}
            row["rss_mb"] = {m: v["VmRSS"] for m, v in mem.items()}
            row["peak_rss_mb"] = {m: v["VmHWM"] for m, v in mem.items()}
            row["servers_rss_mb"] = sum(row["rss_mb"].values())
            row["largest_server_rss_mb"] = max(row["rss_mb"].values())
            print(
                f"{storage}: {len(chain)} servers up in {row['start_s']:.0f} s, "
                f"{row['remote_tok_s']:.2f} tok/s, RSS {row['servers_rss_mb']:.0f} MB in all"
            )
            local = LocalExecutor(spec, weights=storage)
            for name, rt in local.runtimes.items():
                local.set_state(name, ckpt.load_module(directory, name, rt.state))
            for rt in local.runtimes.values():
                rt.compact()  # one copy, as a server keeps
            gc.collect()
            generate(local, pathway, prompt, args.tokens)
            local_tokens, row["local_prefill_s"], row["local_tok_s"] = generate(
                local, pathway, prompt, args.tokens
            )
            row["local_rss_mb"] = proc_memory(os.getpid())["VmRSS"]
            row["remote_vs_local"] = row["remote_tok_s"] / row["local_tok_s"]
            row["tokens_equal"] = tokens == local_tokens
            row["tokens"], row["local_tokens"] = tokens, local_tokens
            del local
            gc.collect()
            rows.append(row)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.spec}: {len(chain)} modules, prompt {args.prompt_len}, {args.tokens} greedy "
        f"tokens; this process {threads} XLA threads, peak RSS {peak:.0f} MB"
    )
    print_table(
        rows,
        [
            ("weights", "weights", ""),
            ("start_s", "start s", ".0f"),
            ("servers_rss_mb", "servers RSS MB", ".0f"),
            ("largest_server_rss_mb", "largest MB", ".0f"),
            ("remote_tok_s", "remote tok/s", ".2f"),
            ("local_tok_s", "local tok/s", ".2f"),
            ("remote_vs_local", "remote/local", ".2f"),
            ("remote_prefill_s", "remote prefill s", ".1f"),
            ("local_prefill_s", "local prefill s", ".1f"),
            ("local_rss_mb", "local RSS MB", ".0f"),
            ("tokens_equal", "tokens equal", ""),
        ],
    )
    print(f"wrote {write_json(out, 'big_pathway', rows, args=vars(args), peak_rss_mb=peak)}")
    return 0


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


if __name__ == "__main__":
    raise SystemExit(main())
