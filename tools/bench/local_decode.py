"""Local prefill and per-token decode: the modular executor against a fused single program.

The baseline (measured in the same run) jits the whole pathway's step as one XLA program; the
modular executor runs one jitted program per module, as the services will. The ratio is the price
of modularity on one machine.

    ./pants run tools/bench/local_decode.py -- [--specs examples/tiny.yaml ...] [--out FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.modules.attention import empty_cache
from pathways.sampling import SamplingParams
from tools.bench.common import median, print_table, timed, write_json

ROOT = Path(__file__).resolve().parents[2]


def fused_step_fn(ex: LocalExecutor, pathway: str):
    """The whole pathway's cached step (embed -> attention* -> head, greedy) as one jit."""
    chain = ex.chain(pathway)

    def step(states, caches, tokens, positions, last, window):
        x = tokens
        new_caches = []
        slots = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        ci = 0
        for rt, st in zip(chain[:-1], states[:-1]):
            m = nnx.merge(rt.graphdef, st)
            if rt.cfg.kind == "attention":
                x, c = m.forward_cached(x, positions, caches[ci], slots, window)
                new_caches.append(c)
                ci += 1
            else:
                x = m(x, positions)
        h = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        logits = nnx.merge(chain[-1].graphdef, states[-1])(h)
        return jnp.argmax(logits, -1).astype(jnp.int32), new_caches

    return jax.jit(step, static_argnames="window", donate_argnums=1)


def bench_spec(path: Path, prompt_len: int, new_tokens: int, repeat: int) -> dict:
    spec = spec_lib.load(path)
    pathway = spec.default_pathway
    ex = LocalExecutor(spec)
    p = spec.pathway(pathway)
    vocab = spec.modules[p.modules[0]].vocab_size
    prompt = list(np.random.default_rng(0).integers(0, vocab, prompt_len))
    window = 1 << (prompt_len + new_tokens - 1).bit_length()

    # ---- modular: the LocalExecutor, one program per module --------------------------------
    def modular_prefill():
        s = ex.open_session(pathway, [SamplingParams()])
        r = ex.prefill(s, [prompt])
        return s, r

    def modular_generate():
        s, r = modular_prefill()
        for _ in range(new_tokens):
            r = ex.decode(s, r.tokens)
        ex.close_session(s)

    modular_generate()  # compile every bucket the run touches
    mod_prefill = median(timed(lambda: ex.close_session(modular_prefill()[0]), repeat))
    mod_total = median(timed(modular_generate, repeat))
    mod_decode = (mod_total - mod_prefill) / new_tokens

    # ---- fused baseline: one program for the whole pathway --------------------------------------
    step = fused_step_fn(ex, pathway)
    states = [rt.state for rt in ex.chain(pathway)]
    attn = [rt.cfg for rt in ex.chain(pathway) if rt.cfg.kind == "attention"]
    max_len = p.max_seq_len
    pos_prompt = np.arange(prompt_len, dtype=np.int32)[None]

    def fused_prefill():
        caches = [empty_cache(c, 1) for c in attn]
        tok, caches = step(
            states,
            caches,
            np.array([prompt], np.int32),
            pos_prompt,
            np.array([prompt_len - 1], np.int32),
            window=min(window, max_len),
        )
        return tok, caches

    def fused_generate():
        tok, caches = fused_prefill()
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
        tok.block_until_ready()

    fused_generate()
    fused_prefill_s = median(timed(lambda: fused_prefill()[0].block_until_ready(), repeat))
    fused_total = median(timed(fused_generate, repeat))
    fused_decode = (fused_total - fused_prefill_s) / new_tokens

    params = sum(rt.param_count() for rt in ex.chain(pathway))
    return {
        "spec": path.name,
        "pathway": pathway,
        "params_m": params / 1e6,
        "modules": len(p.modules),
        "prompt": prompt_len,
        "new_tokens": new_tokens,
        "prefill_ms": mod_prefill * 1e3,
        "fused_prefill_ms": fused_prefill_s * 1e3,
        "decode_ms": mod_decode * 1e3,
        "fused_decode_ms": fused_decode * 1e3,
        "decode_tok_s": 1 / mod_decode,
        "decode_vs_fused": fused_decode / mod_decode,
        "prefill_vs_fused": fused_prefill_s / mod_prefill,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--specs",
        nargs="+",
        default=[str(ROOT / "examples/tiny.yaml"), str(ROOT / "examples/gpt2-small.yaml")],
    )
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "tools/bench/results/local_decode.json"))
    args = ap.parse_args()
    rows = [bench_spec(Path(s), args.prompt_len, args.new_tokens, args.repeat) for s in args.specs]
    print_table(
        rows,
        [
            ("spec", "spec", ""),
            ("params_m", "params (M)", ".1f"),
            ("modules", "modules", "d"),
            ("prefill_ms", "prefill ms", ".1f"),
            ("fused_prefill_ms", "fused prefill ms", ".1f"),
            ("decode_ms", "decode ms/tok", ".2f"),
            ("fused_decode_ms", "fused ms/tok", ".2f"),
            ("decode_tok_s", "tok/s", ".0f"),
            ("decode_vs_fused", "speed vs fused", ".2f"),
        ],
    )
    print(f"wrote {write_json(args.out, 'local_decode', rows, args=vars(args))}")


if __name__ == "__main__":
    main()
