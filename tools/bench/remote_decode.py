"""Decode throughput through module servers (every module its own process) vs the local executor.

Prints a table and writes JSON: local and remote tokens/s on the same checkpoint in the same run
(alternating, best of --rounds each),
wire bytes per decoded token per hop, where each hop's time goes (the servers' StepTiming), and
aggregate tokens/s with 1, 4 and 8 concurrent sessions (the levels in turn, `--batch-rounds`
times: medians, and 8 vs 1 as the median of the rounds' ratios), and, as the same-run baseline
of group messages, the most sessions with every step its own message.

    PYTHONPATH=libs:.:build/gen python -m tools.bench.remote_decode --spec examples/tiny.yaml
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import threading
import time

import numpy as np

from pathways import cpu
from pathways.deploy import launcher
from pathways.executor.local import LocalExecutor
from pathways.executor.remote import RemoteExecutor
from pathways.sampling import SamplingParams
from pathways.serving import testing
from tools.bench.common import write_json


def decode_run(ex, pathway: str, prompt: list[int], n: int) -> float:
    """Tokens/s of n greedy decode steps of one session (a first, untimed pass compiles)."""
    rates = []
    for _ in range(2):
        s = ex.open_session(pathway, [SamplingParams(max_new_tokens=n)])
        try:
            tok = ex.prefill(s, [prompt]).tokens
            t0 = time.perf_counter()
            for _ in range(n):
                tok = ex.decode(s, tok).tokens
            rates.append(n / (time.perf_counter() - t0))
        finally:
            ex.close_session(s)
    return rates[-1]


def concurrent_run(ex, pathway: str, prompt: list[int], n: int, k: int, warm: bool = True) -> float:
    """Aggregate tokens/s of k sessions decoding n tokens each at once (after a first run that
    compiles the batch shapes, unless `warm` is False: they are compiled already)."""
    if warm:
        _concurrent_once(ex, pathway, prompt, n, k)
    return _concurrent_once(ex, pathway, prompt, n, k)


def batching(ex, pathway: str, prompt: list[int], n: int, levels: list[int], rounds: int) -> dict:
    """Aggregate tokens/s at each concurrency level, the levels taken in turn `rounds` times so
    the machine's drift hits them alike: each level's median, and the most sessions against one
    session in each round (its median is `batching_gain`; a single reading of one session moves
    by 10-25 % on a 2-vCPU VM, and the ratio with it)."""
    runs = {k: [] for k in levels}
    for i in range(rounds):
        for k in levels:
            runs[k].append(concurrent_run(ex, pathway, prompt, n, k, warm=i == 0))
    out = {"concurrent_tok_s": {k: float(np.median(v)) for k, v in runs.items()}}
    out["concurrent_runs"] = runs
    top = max(levels)
    if 1 in levels and top > 1:
        ratios = [a / b for a, b in zip(runs[top], runs[1])]
        out["batching_gain"] = {f"{top}_vs_1": float(np.median(ratios))}
        out["batching_gain_rounds"] = ratios
    return out


def _concurrent_once(ex, pathway: str, prompt: list[int], n: int, k: int) -> float:
    barrier, errors = threading.Barrier(k + 1), []
    done = [0.0] * k

    def worker(i):
        try:
            s = ex.open_session(pathway, [SamplingParams(max_new_tokens=n + 2)])
            tok = ex.prefill(s, [prompt]).tokens
            barrier.wait()
            for _ in range(n):
                tok = ex.decode(s, tok).tokens
            done[i] = time.perf_counter()
            ex.close_session(s)
        except BaseException as e:  # reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass  # a worker failed: its error is raised below
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return k * n / (max(done) - t0)


def decode_bytes(ex, spec, pathway, prompt, module, n: int = 8) -> dict[str, float]:
    """Serialized request/response bytes of one decode step to `module` (mean of n steps)."""
    s = ex.open_session(pathway, [SamplingParams(max_new_tokens=n)])
    try:
        tok = ex.prefill(s, [prompt]).tokens
        base = list(ex.wire_bytes[module])
        for _ in range(n):
            tok = ex.decode(s, tok).tokens
        now = ex.wire_bytes[module]
        return {"request": (now[0] - base[0]) / n, "response": (now[1] - base[1]) / n}
    finally:
        ex.close_session(s)


def breakdown(ex, pathway: str, prompt: list[int], n: int) -> dict[str, dict[str, float]]:
    """Where one session's decode hops spend their time (medians over n steps, ms): the call as
    the client sees it, the server's handler and its step (dispatch + compute); call - handler
    is the transport both ways plus the client's side of the call."""
    for ts in ex.step_timings.values():
        ts.clear()
    decode_run(ex, pathway, prompt, n)
    return _hop_medians(ex, n)


def group_breakdown(ex, pathway: str, prompt: list[int], n: int, k: int) -> dict:
    """The same for k sessions decoding at once (their steps grouped): each hop's figures, the
    group step (k tokens' time at the measured rate) and what is left of it outside the hops'
    calls: the sessions' own Python between tokens, and between hops the sender's."""
    _concurrent_once(ex, pathway, prompt, n, k)  # warms up (the shapes are compiled)
    for ts in ex.step_timings.values():
        ts.clear()
    tok_s = _concurrent_once(ex, pathway, prompt, n, k)
    hops = _hop_medians(ex, n * k)
    step = k / tok_s * 1e3
    return {
        "sessions": k,
        "group_step_ms": step,
        "outside_calls_ms": step - sum(h["call_ms"] for h in hops.values()),
        "hops": hops,
    }


def _hop_medians(ex, n: int) -> dict[str, dict[str, float]]:
    out = {}
    for m, ts in ex.step_timings.items():
        if not ts:
            continue
        a = np.asarray(list(ts)[-n:], np.float64) / 1e3  # the timed run's steps
        call, handler, step = (float(np.median(a[:, i])) for i in range(3))
        out[m] = {
            "call_ms": call,
            "handler_ms": handler,
            "step_ms": step,
            "transport_ms": float(np.median(a[:, 0] - a[:, 1])),
            "server_python_ms": float(np.median(a[:, 1] - a[:, 2])),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="examples/tiny.yaml")
    p.add_argument("--pathway", default=None)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument(
        "--modes",
        default="float32:stream,bfloat16:stream,bfloat16:unary",
        help="wire dtype:transport pairs (transport: stream = bidi DecodeStream, unary = Decode)",
    )
    p.add_argument(
        "--batch-wait-ms", type=float, default=2.0, help="module servers' --batch-wait-ms"
    )
    p.add_argument("--kv-cache-mb", type=float, default=512.0, help="per attention server")
    p.add_argument(
        "--weights",
        default="float32",
        choices=["float32", "bfloat16", "int8"],
        help="the dtype the servers (and the local executor) hold the weights in",
    )
    p.add_argument(
        "--server-threads",
        type=int,
        default=0,
        help="XLA threads of each module server (default: all the CPUs, as Fleet gives them)",
    )
    p.add_argument(
        "--local-threads",
        type=int,
        default=0,
        help="XLA threads of the local baseline (default: the same as each server)",
    )
    p.add_argument(
        "--lockstep-ms",
        type=float,
        default=20.0,
        help="RemoteExecutor's lockstep wait (what the gateway uses; 0: off)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating local/remote single-session rounds per mode (best of each is reported)",
    )
    p.add_argument(
        "--batch-rounds",
        type=int,
        default=3,
        help="rounds of the concurrency levels in turn (each level's median; 8 vs 1: the median "
        "of the rounds' ratios)",
    )
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1; got {args.rounds}")
    if args.batch_rounds < 1:
        p.error(f"--batch-rounds must be >= 1; got {args.batch_rounds}")
    levels = [int(x) for x in args.concurrency.split(",")]
    # Before this process's first computation: XLA sizes its thread pool once.
    server_threads = args.server_threads or launcher.cpus()
    local_threads = cpu.limit_threads(args.local_threads or server_threads)
    with tempfile.TemporaryDirectory() as d:
        local = testing.make_checkpoint(d, args.spec)
        spec = local.spec
        if args.weights != "float32":  # the checkpoint's weights, held as the servers hold them
            local = LocalExecutor(spec, seed=0, weights=args.weights)
        pathway = args.pathway or spec.default_pathway
        prompt = list(np.random.default_rng(0).integers(0, 200, args.prompt_len))
        d_model = next(c.d_model for c in spec.modules.values())
        res = {
            "spec": args.spec,
            "pathway": pathway,
            "d_model": d_model,
            "tokens": args.tokens,
            "local_threads": local_threads,
            "server_threads": server_threads,
            "lockstep_ms": args.lockstep_ms,
            "weights": args.weights,
            "local_tok_s": decode_run(local, pathway, prompt, args.tokens),
            "wire": {},
        }
        chain = spec.pathway(pathway).modules
        slots = str(max(levels))
        with launcher.Fleet(
            d,
            list(chain),
            gateway=False,
            env={"PATHWAYS_CPU_THREADS": str(server_threads)},
            module_args=[
                "--max-batch",
                slots,
                "--batch-wait-ms",
                str(args.batch_wait_ms),
                "--kv-cache-mb",
                str(args.kv_cache_mb),
                "--weights",
                args.weights,
            ],
        ) as fleet:
            for mode in args.modes.split(","):
                wire, _, transport = mode.partition(":")
                executor = functools.partial(
                    RemoteExecutor,
                    spec,
                    fleet.endpoints,
                    wire_dtype=wire,
                    decode_streams=transport != "unary",
                    lockstep_wait_s=args.lockstep_ms / 1e3,
                )
                ex = executor()
                # Local and remote alternate, so drift in the machine's load hits both alike;
                # each side's figure is its best round.
                rounds = [
                    (
                        decode_run(local, pathway, prompt, args.tokens),
                        decode_run(ex, pathway, prompt, args.tokens),
                    )
                    for _ in range(args.rounds)
                ]
                r = {
                    "local_runs": [lo for lo, _ in rounds],
                    "remote_runs": [re for _, re in rounds],
                    "local_tok_s": max(lo for lo, _ in rounds),
                    "remote_tok_s": max(re for _, re in rounds),
                    "round_ratios": [re / lo for lo, re in rounds],
                }
                r["remote_vs_local"] = r["remote_tok_s"] / r["local_tok_s"]
                # Each round's two runs are seconds apart; the best-of figures may come from
                # minutes apart, when this machine's speed has drifted by more than the effect.
                r["median_round_ratio"] = float(np.median(r["round_ratios"]))
                r["bytes_per_token"] = {
                    m: decode_bytes(ex, spec, pathway, prompt, m) for m in chain
                }
                print(
                    f"{mode}: local {r['local_tok_s']:.1f} tok/s, remote "
                    f"{r['remote_tok_s']:.1f} tok/s (best of {args.rounds} alternating rounds)",
                    file=sys.stderr,
                    flush=True,
                )
                # What batching gives: the most sessions against one, in the same rounds.
                r.update(batching(ex, pathway, prompt, args.tokens, levels, args.batch_rounds))
                top = max(levels)
                ex.close()
                # The same-run baseline of group messages: the most sessions, each step its
                # own message (lockstep still lines them up for the servers' batching).
                separate = executor(group_steps=False)
                r["concurrent_separate_tok_s"] = {
                    top: concurrent_run(separate, pathway, prompt, args.tokens, top)
                }
                separate.close()
                timed = executor(step_timing=True)  # a separate run: timing adds bytes
                r["per_hop_ms"] = breakdown(timed, pathway, prompt, args.tokens)
                r["group_breakdown"] = group_breakdown(timed, pathway, prompt, args.tokens, top)
                timed.close()
                res["wire"][mode] = r
        # Local again after the servers are gone: brackets the load drift of a shared machine.
        res["local_tok_s_after"] = decode_run(local, pathway, prompt, args.tokens)
    print_table(res)
    if args.json:
        write_json(args.json, "remote_decode", [res])
    return 0


def print_table(res) -> None:
    print(
        f"\n{res['spec']} pathway {res['pathway']} (d_model {res['d_model']}), "
        f"{res['tokens']} decode tokens per session"
    )
    print(
        f"local executor ({res['local_threads']} XLA thread(s); each server "
        f"{res['server_threads']}): {res['local_tok_s']:.1f} tok/s before, "
        f"{res['local_tok_s_after']:.1f} tok/s after the remote runs"
    )
    for wire, r in res["wire"].items():
        conc = ", ".join(f"{k}: {v:.1f}" for k, v in r["concurrent_tok_s"].items())
        conc += "; each step its own message: " + ", ".join(
            f"{k}: {v:.1f}" for k, v in r["concurrent_separate_tok_s"].items()
        )
        conc += "".join(
            f"; {k.replace('_', ' ')}: {v:.2f}x" for k, v in r.get("batching_gain", {}).items()
        )
        if len(r.get("batching_gain_rounds", [])) > 1:
            conc += " (rounds " + " ".join(f"{x:.2f}" for x in r["batching_gain_rounds"]) + ")"
        rounds = " ".join(f"{x:.2f}" for x in r["round_ratios"])
        print(
            f"{wire:<16} remote {r['remote_tok_s']:.1f} tok/s vs local {r['local_tok_s']:.1f} "
            f"({r['remote_vs_local']:.2f}x; per round {rounds}, median "
            f"{r['median_round_ratio']:.2f}); "
            f"concurrent sessions -> tok/s {conc}"
        )
        for m, b in r["bytes_per_token"].items():
            h = r["per_hop_ms"][m]
            print(
                f"    hop {m:<12} request {b['request']:8.0f} B/token  "
                f"response {b['response']:8.0f} B/token  |  call {h['call_ms']:6.2f} ms = "
                f"step {h['step_ms']:6.2f} + server Python {h['server_python_ms']:5.2f} + "
                f"transport and client {h['transport_ms']:5.2f}"
            )
        g = r.get("group_breakdown")
        if g:
            print(
                f"    {g['sessions']} sessions at once: group step {g['group_step_ms']:.2f} ms, "
                f"of which outside the hops' calls (the sessions' Python between tokens, the "
                f"sender's between hops) {g['outside_calls_ms']:.2f} ms"
            )
            for m, h in g["hops"].items():
                print(
                    f"    hop {m:<12} call {h['call_ms']:6.2f} ms = step {h['step_ms']:6.2f} + "
                    f"server Python {h['server_python_ms']:5.2f} + transport and client "
                    f"{h['transport_ms']:5.2f}"
                )


if __name__ == "__main__":
    sys.exit(main())
