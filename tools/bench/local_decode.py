"""Local prefill and per-token decode: what users run against one hand-written program.

Three sides on the same parameters, measured alternately in one run (medians of the per-repetition
ratios): the `LocalExecutor` session API as users call it (prefill + decode; its step through a
pathway is one fused program by default), the same executor with `fuse=False` (one program per
module, as the module servers run them), and the baseline: the whole pathway's cached step written
by hand as one jitted function. Greedy tokens of all three are compared. Prefill is timed as its
own call (open a session, prefill, close it); decode is the time of a generation's decode steps
alone (after its prefill's token is read, until the last token is read), per token.

    ./pants run tools/bench/local_decode.py -- [--specs examples/tiny.yaml ...] [--repeat 15]
    (or: PYTHONPATH=libs:.:build/gen .venv/py312/bin/python -m tools.bench.local_decode)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathways import backends
from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.sampling import SamplingParams
from tools.bench.common import dated_path, median, print_table, timed, write_json

ROOT = Path(__file__).resolve().parents[2]


def fused_step_fn(ex: LocalExecutor, pathway: str, prefill: bool):
    """The whole pathway's cached step (embed -> attention* -> head, greedy) as one jit, written
    by hand: step(params, caches, tokens, positions, last, window=) with `params` the flat list
    of every module's parameter arrays (what a careful hand-written program passes; an
    nnx.State would cost a Python callback per Variable on every call). Returns (step, params):
    the parameters the executor computes with for a prefill chunk or a decode step, so both
    sides run on the same backend (native kernels where PATHWAYS_KERNELS chose them)."""
    chain = ex.chain(pathway)
    copies = [rt.serving_for(prefill) for rt in chain]
    natives = [rt.native_attention for rt in chain]
    treedef = jax.tree.structure(copies)

    def step(params, caches, tokens, positions, last, window):
        states = jax.tree.unflatten(treedef, params)
        x = tokens
        new_caches = []
        slots = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        ci = 0
        for rt, st, native in zip(chain[:-1], states[:-1], natives):
            m = nnx.merge(rt.graphdef, st)
            if rt.kind.has_cache:
                with backends.using(native):  # the backend the runtime chose for this module
                    x, c = m.step(x, positions, caches[ci], slots, window)
                new_caches.append(c)
                ci += 1
            else:
                x, _ = m.step(x, positions)
        h = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        logits = nnx.merge(chain[-1].graphdef, states[-1])(h)
        return jnp.argmax(logits, -1).astype(jnp.int32), new_caches

    return jax.jit(step, static_argnames="window", donate_argnums=1), jax.tree.leaves(copies)


def bench_spec(path: Path, prompt_len: int, new_tokens: int, repeat: int) -> dict:
    spec = spec_lib.load(path)
    pathway = spec.default_pathway
    ex = LocalExecutor(spec)
    unfused = LocalExecutor(spec, {m: ex.state(m) for m in ex.runtimes}, fuse=False)
    p = spec.pathway(pathway)
    vocab = spec.modules[p.modules[0]].vocab_size
    prompt = list(np.random.default_rng(0).integers(0, vocab, prompt_len))
    window = 1 << (prompt_len + new_tokens - 1).bit_length()

    # ---- what users run: the LocalExecutor session API ---------------------------------------
    def session_sides(executor):
        def prefill():
            s = executor.open_session(pathway, [SamplingParams()])
            r = executor.prefill(s, [prompt])
            return s, r

        def generate():
            s, r = prefill()
            out = [int(r.tokens[0])]
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                r = executor.decode(s, r.tokens)
                out.append(int(r.tokens[0]))
            decode_s = time.perf_counter() - t0
            executor.close_session(s)
            return out, decode_s

        return (lambda: executor.close_session(prefill()[0])), generate

    # ---- baseline: one hand-written program for the whole pathway -------------------------------
    prefill_step, prefill_params = fused_step_fn(ex, pathway, prefill=True)
    step, states = fused_step_fn(ex, pathway, prefill=False)
    attn = [rt for rt in ex.chain(pathway) if rt.kind.has_cache]
    max_len = p.max_seq_len
    pos_prompt = np.arange(prompt_len, dtype=np.int32)[None]

    def base_prefill():
        caches = [rt.kind.empty_cache(rt.cfg, 1) for rt in attn]
        tok, caches = prefill_step(
            prefill_params,
            caches,
            np.array([prompt], np.int32),
            pos_prompt,
            np.array([prompt_len - 1], np.int32),
            window=min(window, max_len),
        )
        return np.asarray(tok), caches

    def base_generate():
        tok, caches = base_prefill()
        out = [int(tok[0])]
        t0 = time.perf_counter()
        for i in range(new_tokens):
            pos = np.array([[prompt_len + i]], np.int32)
            tok, caches = step(
                states,
                caches,
                tok[:, None],
                pos,
                np.zeros(1, np.int32),
                window=min(window, max_len),
            )
            tok = np.asarray(tok)
            out.append(int(tok[0]))
        return out, time.perf_counter() - t0

    sides = {
        "executor": session_sides(ex),
        "unfused": session_sides(unfused),
        "baseline": (lambda: base_prefill(), base_generate),
    }
    tokens = {name: gen()[0] for name, (_, gen) in sides.items()}  # compiles every bucket
    times = {name: {"prefill": [], "decode": []} for name in sides}
    for _ in range(repeat):  # alternate the sides: drift hits them alike
        for name, (prefill, generate) in sides.items():
            times[name]["prefill"] += timed(prefill, 1)
            times[name]["decode"].append(generate()[1])  # the decode steps' own time

    def decode_s(name, i):
        return times[name]["decode"][i] / new_tokens

    def ratio(name, phase):  # median over repetitions of baseline time / this side's time
        if phase == "decode":
            return median([decode_s("baseline", i) / decode_s(name, i) for i in range(repeat)])
        return median([times["baseline"][phase][i] / times[name][phase][i] for i in range(repeat)])

    row = {
        "spec": path.name,
        "pathway": pathway,
        "params_m": sum(rt.param_count() for rt in ex.chain(pathway)) / 1e6,
        "modules": len(p.modules),
        "prompt": prompt_len,
        "new_tokens": new_tokens,
        "repeat": repeat,
        "tokens_equal": tokens["executor"] == tokens["baseline"] == tokens["unfused"],
        "tokens_differ_at": next(
            (i for i, (a, b) in enumerate(zip(tokens["executor"], tokens["baseline"])) if a != b),
            None,
        ),
    }
    for name in sides:
        row[f"{name}_prefill_ms"] = median(times[name]["prefill"]) * 1e3
        row[f"{name}_decode_ms"] = median([decode_s(name, i) for i in range(repeat)]) * 1e3
    for name in ("executor", "unfused"):
        row[f"{name}_decode_vs_baseline"] = ratio(name, "decode")
        row[f"{name}_prefill_vs_baseline"] = ratio(name, "prefill")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--specs",
        nargs="+",
        default=[str(ROOT / "examples/tiny.yaml"), str(ROOT / "examples/gpt2-small.yaml")],
    )
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--repeat",
        type=int,
        default=15,
        help="alternating repetitions (>= 5; a small spec's per-repetition ratios swing with the "
        "thread hand-offs of each step: the median of 15 holds where that of 5-7 moves)",
    )
    ap.add_argument("--out", default=None, help="JSON record (default: a dated file in results/)")
    args = ap.parse_args()
    out = args.out or dated_path(ROOT / "tools/bench/results", "local_decode")
    rows = [bench_spec(Path(s), args.prompt_len, args.new_tokens, args.repeat) for s in args.specs]
    print_table(
        rows,
        [
            ("spec", "spec", ""),
            ("params_m", "params (M)", ".1f"),
            ("modules", "modules", "d"),
            ("executor_prefill_ms", "prefill ms", ".1f"),
            ("unfused_prefill_ms", "unfused", ".1f"),
            ("baseline_prefill_ms", "baseline", ".1f"),
            ("executor_decode_ms", "decode ms/tok", ".2f"),
            ("unfused_decode_ms", "unfused", ".2f"),
            ("baseline_decode_ms", "baseline", ".2f"),
            ("executor_decode_vs_baseline", "decode x", ".3f"),
            ("unfused_decode_vs_baseline", "unfused x", ".3f"),
            ("executor_prefill_vs_baseline", "prefill x", ".3f"),
            ("tokens_equal", "tokens equal", ""),
        ],
    )
    print("x: the baseline's time / this side's (median of per-repetition ratios; 1 = as fast)")
    print(f"wrote {write_json(out, 'local_decode', rows, args=vars(args))}")


if __name__ == "__main__":
    main()
