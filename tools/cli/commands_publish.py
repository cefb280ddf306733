"""`pathways publish`: the served weights of a running deployment's modules, replaced (admin).

Module servers started to train (`--training`; `pathways up` and `demo` do) train copies of their
weights; nothing a job does reaches what they serve until this step: from a training run's
checkpoint (`--checkpoint DIR`, a directory the servers may read) or from each server's training
copy (`--from-training`)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "publish",
        help="serve new weights on a running deployment's module servers (admin API key)",
        description=__doc__,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training run's checkpoint directory")
    src.add_argument(
        "--from-training",
        action="store_true",
        help="each replica's own training copy (what TrainingService trained on it)",
    )
    p.add_argument("modules", nargs="*", help="module names (default: every module)")
    p.add_argument("--gateway", help="gateway HOST:PORT (default: the running deployment's)")
    p.set_defaults(func=cmd_publish)


def cmd_publish(args) -> int:
    from pathlib import Path

    import grpc

    from pathways.v1 import gateway_pb2, gateway_pb2_grpc
    from tools.cli import connect

    gw = connect.gateway(args.gateway)
    checkpoint = str(Path(args.checkpoint).absolute()) if args.checkpoint else ""
    req = gateway_pb2.PublishModulesRequest(
        modules=args.modules, checkpoint=checkpoint, from_training=args.from_training
    )
    with gw.channel() as ch:
        try:
            r = gateway_pb2_grpc.GatewayServiceStub(ch).Publish(
                req, timeout=300, metadata=gw.metadata
            )
        except grpc.RpcError as e:
            raise ValueError(f"gateway {gw.address}: {e.code().name}: {e.details()}") from None
    source = checkpoint or "their training copies"
    print(f"published {source} to {', '.join(r.published)}")
    return 0
