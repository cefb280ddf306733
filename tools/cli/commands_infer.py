"""`pathways classify` and `pathways transcribe`: one image or WAV file through a pathway, via a
gateway's Infer (the local deployment's, or --gateway) or in this process (--checkpoint)."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    for name, field, what in (
        ("classify", "image", "a PNG or JPEG image (its size and channels the pathway's)"),
        ("transcribe", "wav", "a WAV file (16-bit PCM, mono, the pathway's sample rate)"),
    ):
        p = sub.add_parser(
            name,
            help=f"{name} {what} through a pathway: via the gateway (default: the local "
            "deployment's) or in this process with --checkpoint",
        )
        p.add_argument(f"--{field}", required=True, metavar="FILE", help=what)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--gateway", help="HOST:PORT of a gateway (default: `pathways up`'s)")
        where.add_argument("--checkpoint", help="run in this process from this checkpoint")
        p.add_argument(
            "--pathway",
            default="",
            help=f"pathway to run (default: the first that reads {'images' if field == 'image' else 'audio'})",
        )
        if name == "classify":
            p.add_argument("--top-k", type=int, default=3, help="classes to print (0: all)")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds (gateway)")
        p.set_defaults(func=cmd_infer, field=field)


def cmd_infer(args) -> int:
    path = Path(getattr(args, args.field))
    data = path.read_bytes()  # OSError: one line, exit 2 (main)
    top_k = getattr(args, "top_k", 0)
    if top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: all classes); got {top_k}")
    if args.checkpoint:
        result = _in_process(args.checkpoint, args.pathway, args.field, data, top_k)
    else:
        result = _via_gateway(args.gateway, args.pathway, args.field, data, top_k, args.timeout)
    print(f"{path.name}: pathway {result.pathway!r}", file=sys.stderr)
    if result.kind == "classification":
        for c, prob in zip(result.classes[0], result.probabilities[0]):
            print(f"{c}\t{prob:.4f}")
    else:
        print(result.texts[0])
    return 0


def _in_process(checkpoint: str, pathway: str, field: str, data: bytes, top_k: int):
    from pathways import checkpoint as ckpt
    from pathways import infer
    from pathways.executor.local import LocalExecutor

    spec, tok = ckpt.load_spec(checkpoint)
    if field == "wav":  # the speech pathway's own in-process path
        from pathways.transcribe import Transcriber

        name = infer.choose_pathway(spec, spec.pathways, pathway, field)
        first = spec.modules[spec.pathway(name).modules[0]]
        if first.input_contract[0] != "audio":
            raise ValueError(f"pathway {name!r} reads {first.input_contract[0]}, not audio")
        wave = infer.decode_wav(data, first)[0]
        text = Transcriber(checkpoint, name).transcribe(wave, first.sample_rate)
        return infer.Result(name, "transcript", texts=[text])
    name, x = infer.prepare(spec, spec.pathways, pathway, field, data, tok)
    missing = [m for m in spec.pathway(name).modules if not ckpt.has_module(checkpoint, m)]
    if missing:
        raise ValueError(
            f"checkpoint {checkpoint} has no weights for module(s) {', '.join(missing)} of "
            f"pathway {name!r}"
        )
    ex = LocalExecutor(spec.only(name), checkpoint=checkpoint)
    return infer.run(ex, name, x, "head", top_k)


def _via_gateway(address, pathway: str, field: str, data: bytes, top_k: int, timeout: float):
    import grpc

    from pathways import infer
    from pathways.v1 import gateway_pb2, gateway_pb2_grpc
    from tools.cli import connect

    gw = connect.gateway(address)
    req = gateway_pb2.InferRequest(pathway=pathway, top_k=top_k, **{field: data})
    with gw.channel() as ch:
        try:
            r = gateway_pb2_grpc.GatewayServiceStub(ch).Infer(
                req, timeout=timeout, metadata=gw.metadata
            )
        except grpc.RpcError as e:
            raise ValueError(f"gateway {gw.address}: {e.code().name}: {e.details()}") from None
    which = r.WhichOneof("result")
    if which == "classification":
        items = r.classification.items
        return infer.Result(
            r.pathway,
            "classification",
            classes=[list(i.classes) for i in items],
            probabilities=[list(i.probabilities) for i in items],
        )
    if which == "transcript":
        return infer.Result(r.pathway, "transcript", texts=list(r.transcript.texts))
    raise ValueError(f"gateway {gw.address}: answered with {which or 'nothing'}, not a result")
