"""The transformers side of tools/bench/hf_decode.py: runs in the Python 3.11 torch venv.

    make  --out DIR                  writes a random GPT-2-small-sized checkpoint (save_pretrained)
    serve --hf-dir DIR --threads N   loads it, then answers one JSON request per stdin line:
                                     {"prompt": [ids], "n": new tokens} -> {"s": secs, "tokens": [...]}

A long-lived worker lets the benchmark alternate the two implementations rep by rep, so load from
other processes on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the checkpoint is local; never reach for a hub

# Imported after HF_HUB_OFFLINE is set: huggingface_hub reads it at import time.
import torch  # pants: no-infer-dep  # noqa: E402
import transformers  # pants: no-infer-dep  # noqa: E402


def make(out: str) -> None:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())  # 124M, tied head
    model.save_pretrained(out, safe_serialization=True)
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))


def serve(hf_dir: str, threads: int, dtype: str) -> None:
    torch.set_num_threads(threads)
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
    model = model.eval()
    print(
        json.dumps(
            {
                "ready": True,
                "threads": torch.get_num_threads(),
                "dtype": str(next(model.parameters()).dtype),
                "params": sum(p.numel() for p in model.parameters()),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        req = json.loads(line)
        ids = torch.tensor([req["prompt"]], dtype=torch.long)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=req["n"],
                min_new_tokens=req["n"],
                eos_token_id=None,
                pad_token_id=0,
            )
            secs = time.perf_counter() - t0
        print(json.dumps({"s": secs, "tokens": out[0, ids.shape[1] :].tolist()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["make", "serve"])
    ap.add_argument("--out")
    ap.add_argument("--hf-dir")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    if args.command == "make":
        make(args.out)
    else:
        serve(args.hf_dir, args.threads, args.dtype)


if __name__ == "__main__":
    main()
