"""Serving latency of the gateway's Infer (classify, transcribe) against the same requests in one
process.

A randomly initialised checkpoint of --spec (latency does not depend on the weights' values) is
served by a local deployment: every module of the digits and speech pathways its own server
process, a gateway (plaintext on loopback, or --tls: mutual TLS and an API key, as `pathways up`
runs). One client sends one request at a time: a PNG digit (8x8, `pathways classify`) or a WAV
utterance (`pathways transcribe`; a synthetic 0.6 s word-like sound at the pathway's sample rate,
zero-padded to max_samples by the gateway). Per request: the time from sending it to having the
answer. In process, the same bytes through `pathways.infer` over a LocalExecutor (decode, check,
every module's jitted forward, head) — what `pathways classify --checkpoint` runs — and through
the pathways' own jitted programs (Classifier, Transcriber; one request each). After
--warmup requests (compiling), --requests timed ones per path; p50 and p99 in ms. Prints a table
and writes JSON.

    PYTHONPATH=libs:.:build/gen python -m tools.bench.infer_latency [--requests 300]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from tools.bench.common import dated_path, print_table, write_json

ROOT = Path(__file__).resolve().parents[2]


def _png(pixels_hw: np.ndarray) -> bytes:
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", (pixels_hw * 255).round().astype(np.uint8), extension=".png")


def _utterance(rate: int, seconds: float = 0.6) -> np.ndarray:
    """A word-like sound: a gliding harmonic tone in a syllable envelope, plus a little noise."""
    t = np.arange(int(rate * seconds)) / rate
    f0 = 140 + 60 * t / seconds
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = np.sin(np.pi * t / seconds) ** 2
    noise = np.random.default_rng(0).normal(0, 0.01, len(t))
    return (0.3 * voiced * env + noise).astype(np.float32)


def _percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "requests": len(ms),
    }


def _time(fn, warmup: int, n: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=str(ROOT / "examples/multitask.yaml"))
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--tls", action="store_true", help="mutual TLS and API keys, as `up` runs")
    ap.add_argument("--out", default=str(ROOT / "tools/bench/results"))
    args = ap.parse_args(argv)

    from pathways import audio, infer, tokenizers
    from pathways import checkpoint as ckpt
    from pathways import spec as spec_lib
    from pathways.classify import Classifier
    from pathways.datasets.digits import digits
    from pathways.deploy.local import LocalDeployment
    from pathways.executor.local import LocalExecutor
    from pathways.v1 import gateway_pb2, gateway_pb2_grpc
    from tools.cli import connect

    spec = spec_lib.load(args.spec)
    tasks = {}  # name -> (pathway, field, bytes)
    for p in spec.pathways.values():
        first, head = spec.modules[p.modules[0]], spec.modules[p.modules[-1]]
        reads, outputs = first.input_contract[0], head.output_contract[0]
        if reads == "image" and outputs == "classes" and "classify" not in tasks:
            tasks["classify"] = (p.name, "image", _png(digits().test_images[0, ..., 0]))
        if reads == "audio" and outputs == "characters" and "transcribe" not in tasks:
            wave = _utterance(first.sample_rate)
            tasks["transcribe"] = (p.name, "wav", audio.encode_wav(wave, first.sample_rate))
    if not tasks:
        raise SystemExit(f"{args.spec} has no image classification or speech pathway")
    modules = sorted({m for name, _, _ in tasks.values() for m in spec.pathway(name).modules})

    home = Path(tempfile.mkdtemp(prefix="infer-latency-"))
    directory = home / "ckpt"
    ex = LocalExecutor(spec, seed=0)
    ckpt.save_spec(directory, spec, tokenizers.ByteTokenizer())
    for m in modules:
        ckpt.save_module(directory, m, ex.state(m))

    rows = []
    os.environ["PATHWAYS_HOME"] = str(home)  # the deployment's state file: connect finds it
    dep = LocalDeployment(directory, coordinator=False, secure_dir=home if args.tls else None)
    dep.start()
    try:
        gw = connect.gateway(dep.gateway)
        with gw.channel() as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            for task, (pathway, field, data) in tasks.items():
                req = gateway_pb2.InferRequest(pathway=pathway, top_k=1, **{field: data})

                def call(req=req):
                    stub.Infer(req, timeout=60, metadata=gw.metadata)

                rows.append(
                    {
                        "task": task,
                        "path": "services (gateway Infer)",
                        **_percentiles(_time(call, args.warmup, args.requests)),
                    }
                )
    finally:
        dep.stop()

    for task, (pathway, field, data) in tasks.items():

        def local(pathway=pathway, field=field, data=data):
            name, x = infer.prepare(spec, spec.pathways, pathway, field, data)
            infer.run(ex, name, x, top_k=1)

        rows.append(
            {
                "task": task,
                "path": "in process (infer over LocalExecutor)",
                **_percentiles(_time(local, args.warmup, args.requests)),
            }
        )
        first = spec.modules[spec.pathway(pathway).modules[0]]
        if task == "classify":
            own = Classifier(ex, pathway, batch_size=1)

            def fused(data=data, first=first, own=own):
                own.predict(infer.decode_image(data, first))

            label = "in process (Classifier, one jitted program)"
        else:
            from pathways.transcribe import Transcriber

            own = Transcriber(ex, pathway, batch_size=1)

            def fused(data=data, first=first, own=own):
                own.transcribe(infer.decode_wav(data, first)[0], first.sample_rate)

            label = "in process (Transcriber, one jitted program)"
        rows.append(
            {"task": task, "path": label, **_percentiles(_time(fused, args.warmup, args.requests))}
        )

    print_table(
        rows,
        [
            ("task", "task", "s"),
            ("path", "path", "s"),
            ("p50_ms", "p50 ms", ".2f"),
            ("p99_ms", "p99 ms", ".2f"),
            ("mean_ms", "mean ms", ".2f"),
        ],
    )
    path = write_json(
        dated_path(args.out, "infer_latency"),
        "infer_latency",
        rows,
        spec=args.spec,
        tls=args.tls,
        requests=args.requests,
        warmup=args.warmup,
        modules=modules,
        load_average=os.getloadavg(),  # the machine is shared: how busy it was at the end
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
