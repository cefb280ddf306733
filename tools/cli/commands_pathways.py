"""`pathways pathways list|add|remove|add-module`: the pathway table of a running gateway."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("pathways", help="list, add or remove pathways of a running deployment")
    p.add_argument(
        "action", choices=["list", "add", "remove", "add-module"], nargs="?", default="list"
    )
    p.add_argument("name", nargs="?", help="pathway (or, for add-module, module) name")
    p.add_argument(
        "items",
        nargs="*",
        help="add: module names in order; add-module: replica addresses HOST:PORT",
    )
    p.add_argument("--gateway", help="gateway HOST:PORT (default: the running deployment's)")
    p.set_defaults(func=cmd_pathways)


def cmd_pathways(args) -> int:
    import grpc

    from pathways.v1 import gateway_pb2, gateway_pb2_grpc
    from tools.cli import connect

    gw = connect.gateway(args.gateway)
    address, md = gw.address, gw.metadata
    if args.action != "list" and not args.name:
        raise ValueError(f"pathways {args.action} needs a NAME")
    if args.action in ("add", "add-module") and not args.items:
        what = "module names" if args.action == "add" else "replica addresses"
        raise ValueError(f"pathways {args.action} {args.name} needs {what}")
    with gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        try:
            if args.action == "list":
                listed = stub.ListPathways(
                    gateway_pb2.ListPathwaysRequest(), timeout=10, metadata=md
                )
                for p in listed.pathways:
                    if p.paths:  # a routed family: a request naming it runs on one path
                        print(f"{p.name:<20} routed to one of {', '.join(p.paths)}")
                        continue
                    print(f"{p.name:<20} {' -> '.join(p.modules)}  (max_seq_len {p.max_seq_len})")
            elif args.action == "add":
                r = stub.SetPathway(
                    gateway_pb2.SetPathwayRequest(name=args.name, modules=args.items),
                    timeout=10,
                    metadata=md,
                )
                print(f"{r.pathway.name}: {' -> '.join(r.pathway.modules)}")
            elif args.action == "remove":
                stub.RemovePathway(
                    gateway_pb2.RemovePathwayRequest(name=args.name), timeout=10, metadata=md
                )
                print(f"removed pathway {args.name}")
            else:
                r = stub.AddModule(
                    gateway_pb2.AddModuleRequest(name=args.name, addresses=args.items),
                    timeout=30,
                    metadata=md,
                )
                print(f"module {args.name} ({r.kind}) at {', '.join(args.items)}")
        except grpc.RpcError as e:
            raise ValueError(f"gateway {address}: {e.code().name}: {e.details()}") from None
    return 0
