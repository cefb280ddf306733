"""Imported GPT-2 (124M): Pathways LocalExecutor against transformers' `generate`, same weights.

All sides generate greedily from the same prompt, on the same pinned CPUs with the same thread
count, in this run: transformers sides are long-lived Python 3.11 workers from the torch venv
(torch never enters the Pants build), and the sides alternate rep by rep so that load from other
processes hits them alike; each figure is the best of its reps. Prefill is the time to the first
token; decode is the time per further token.

Sides (--sides): `pathways` (float32 weights, the default backend: plain XLA unless
PATHWAYS_KERNELS asks for the native kernels), `pathways-bf16` (weights stored in bfloat16,
float32 arithmetic), `pathways-native` / `pathways-native-bf16` (the opt-in native CPU kernels;
need PATHWAYS_KERNELS=auto or native), `pathways-xla` (XLA's dot even where the kernels are on),
`transformers` (float32), `transformers-bf16` (torch in bfloat16). Ratios are against
`transformers`.

    tools/dev_env.sh --torch   # once: .venv/py312, and .venv/py311-torch for the torch workers
    PYTHONPATH=libs:. .venv/py312/bin/python tools/bench/hf_decode.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().with_name("hf_decode_torch.py")
TORCH_PYTHON = ".venv/py311-torch/bin/python"  # relative to ROOT; made by tools/dev_env.sh --torch


def _shown(path) -> str:
    """A path as recorded: relative to the repository when inside it (no machine's own path)."""
    path = Path(os.path.abspath(path))  # not resolve(): a venv's python is a link out of it
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def pin(threads: int) -> list[int]:
    """Restricts this process (and the torch worker it starts) to `threads` CPUs.

    Must run before jax is imported: XLA sizes its CPU thread pool from the affinity mask.
    """
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    return cpus


class TorchWorker:
    def __init__(self, python: str, hf_dir: Path, threads: int, dtype: str = "float32"):
        cmd = [python, str(WORKER), "serve", "--hf-dir", str(hf_dir), "--threads", str(threads)]
        self.proc = subprocess.Popen(
            [*cmd, "--dtype", dtype],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker exited with code {self.proc.wait()}")
        return json.loads(line)

    def generate(self, prompt: list[int], n: int) -> tuple[float, list[int]]:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "n": n}) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        return r["s"], r["tokens"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


class PathwaysSide:
    def __init__(self, hf_dir: Path, split: str, weights: str = "float32", native=None):
        from pathways.executor.local import LocalExecutor
        from pathways.hf import convert

        imported = convert.load_hf(hf_dir, split)
        self.ex = LocalExecutor(imported.spec, imported.states(), weights=weights, native=native)
        self.pathway = imported.pathway
        self.modules = len(imported.spec.pathway(self.pathway).modules)

    def generate(self, prompt: list[int], n: int) -> tuple[float, list[int]]:
        from pathways.sampling import SamplingParams

        t0 = time.perf_counter()
        s = self.ex.open_session(self.pathway, [SamplingParams(max_new_tokens=n)])
        r = self.ex.prefill(s, [prompt])
        out = [int(r.tokens[0])]  # a host value: the step has finished
        while len(out) < n:
            r = self.ex.decode(s, r.tokens)
            out.append(int(r.tokens[0]))
        self.ex.close_session(s)
        return time.perf_counter() - t0, out


# side -> (implementation, weights dtype, native matmul: None = as PATHWAYS_KERNELS says)
SIDES = {
    "pathways": ("pathways", "float32", None),
    "pathways-bf16": ("pathways", "bfloat16", None),
    "pathways-native": ("pathways", "float32", True),
    "pathways-native-bf16": ("pathways", "bfloat16", True),
    "pathways-xla": ("pathways", "float32", False),
    "transformers": ("torch", "float32", None),
    "transformers-bf16": ("torch", "bfloat16", None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--hf-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "pathways-bench" / "gpt2-124m",
        help="made with random weights if missing",
    )
    ap.add_argument(
        "--torch-python",
        type=Path,
        default=ROOT / TORCH_PYTHON,
        help=f"a Python 3.11 with torch and transformers (default: {TORCH_PYTHON} in the repo)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--split", default="6,6", help="attention layers per module (Pathways side)")
    ap.add_argument(
        "--settle-s",
        type=float,
        default=0.5,
        help="pause before each timed generation, so the previous side's idle threads park",
    )
    ap.add_argument(
        "--sides",
        default="pathways,pathways-bf16,transformers,transformers-bf16",
        help=f"comma-separated, from {', '.join(SIDES)}; must include transformers",
    )
    ap.add_argument("--out", default=None, help="JSON record (default: a dated file in results/)")
    args = ap.parse_args()
    wanted = args.sides.split(",")
    if "transformers" not in wanted or not set(wanted) <= set(SIDES):
        ap.error(f"--sides must include transformers and name only {', '.join(SIDES)}")
    if not args.torch_python.is_file():
        ap.error(
            f"--torch-python {args.torch_python} does not exist: make it with "
            f"`tools/dev_env.sh --torch`, or name a Python 3.11 with torch and transformers"
        )
    cpus = pin(args.threads)

    if not (args.hf_dir / "config.json").exists():
        print(f"making a random GPT-2 checkpoint in {args.hf_dir} ...", file=sys.stderr)
        subprocess.run(
            [str(args.torch_python), str(WORKER), "make", "--out", str(args.hf_dir)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    if any(SIDES[w][2] for w in wanted):
        from pathways import kernels

        if not kernels.available():
            ap.error(
                "the pathways-native sides need the native kernels: set PATHWAYS_KERNELS=auto "
                f"or native (now {kernels.mode()!r}), with a C++ compiler on PATH"
            )
    import numpy as np

    from tools.bench.common import dated_path, print_table, write_json

    prompt = np.random.default_rng(0).integers(0, 50257, args.prompt_len).tolist()
    sides = {}
    n = 1 + args.new_tokens
    try:
        for name in wanted:
            kind, weights, native = SIDES[name]
            if kind == "pathways":
                sides[name] = PathwaysSide(args.hf_dir, args.split, weights, native)
            else:
                python = str(args.torch_python)
                sides[name] = TorchWorker(python, args.hf_dir, args.threads, weights)
        tokens = {k: s.generate(prompt, n)[1] for k, s in sides.items()}  # warm-up / compile
        times = {k: {"prefill": [], "total": []} for k in sides}
        for _ in range(args.repeat):
            for k, s in sides.items():
                # Both runtimes' thread pools spin for a while after their last task (OpenMP's
                # wait policy, Eigen's work stealing); with more than one thread, a side timed
                # right after another ran on cores the other's idle workers were still spinning
                # on (2 threads: 25.4 ms/token here against 19.5-21 ms alone). Let them park.
                time.sleep(args.settle_s)
                times[k]["prefill"].append(s.generate(prompt, 1)[0])
                time.sleep(args.settle_s)
                times[k]["total"].append(s.generate(prompt, n)[0])
    finally:
        for side in sides.values():
            if isinstance(side, TorchWorker):
                side.close()

    rows = []
    for k, t in times.items():
        prefill, total = min(t["prefill"]), min(t["total"])
        decode = (total - prefill) / args.new_tokens
        rows.append(
            {
                "impl": k,
                "prefill_ms": prefill * 1e3,
                "decode_ms": decode * 1e3,
                "decode_tok_s": 1 / decode,
            }
        )
    hf = next(r for r in rows if r["impl"] == "transformers")
    for r in rows:
        r["decode_vs_hf"] = r["decode_tok_s"] / hf["decode_tok_s"]
        r["prefill_vs_hf"] = hf["prefill_ms"] / r["prefill_ms"]
        r["same_tokens_as_hf"] = tokens[r["impl"]] == tokens["transformers"]
    pw = next((r for r in rows if r["impl"] == "pathways"), None)
    speed = {
        "decode_speedup": pw and pw["decode_vs_hf"],
        "prefill_speedup": pw and pw["prefill_vs_hf"],
        "same_tokens": pw and pw["same_tokens_as_hf"],
    }
    info = sides["transformers"].info
    modules = next((s.modules for s in sides.values() if isinstance(s, PathwaysSide)), 0)
    print(
        f"GPT-2 {info['params'] / 1e6:.0f}M params, prompt {args.prompt_len}, "
        f"{args.new_tokens} decode steps, best of {args.repeat}, {args.threads} thread(s) on "
        f"CPU(s) {cpus}; Pathways in {modules} modules (split {args.split})"
    )
    print_table(
        rows,
        [
            ("impl", "impl", ""),
            ("prefill_ms", "prefill ms", ".1f"),
            ("decode_ms", "decode ms/tok", ".2f"),
            ("decode_tok_s", "tok/s", ".1f"),
            ("decode_vs_hf", "decode vs transformers", ".2f"),
            ("prefill_vs_hf", "prefill vs transformers", ".2f"),
            ("same_tokens_as_hf", "same greedy tokens", ""),
        ],
    )
    out = args.out or dated_path(ROOT / "tools/bench/results", "hf_decode")
    path = write_json(
        out,
        "hf_decode",
        rows,
        **speed,
        cpus=cpus,
        versions=info["versions"],
        raw_s=times,
        args={
            **vars(args),
            "hf_dir": str(args.hf_dir),
            "torch_python": _shown(args.torch_python),
            "out": _shown(out),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
