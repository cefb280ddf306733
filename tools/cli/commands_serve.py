"""Serving commands: `up` (every module its own local process + a gateway) and gateway generation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pathways import checkpoint as ckpt

if TYPE_CHECKING:
    from pathways.deploy.local import LocalDeployment


def register(sub) -> None:
    p = sub.add_parser(
        "up", help="serve a checkpoint: every module its own process, plus a gateway"
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="MODULE=N",
        help="replicas of a module (repeatable; default 1 each)",
    )
    p.add_argument(
        "--colocate",
        action="append",
        default=[],
        metavar="A,B[,...]",
        help="serve consecutive modules of a pathway from one process that steps them as one "
        "program, e.g. --colocate attn-0,attn-1 (repeatable; --replicas then names the group). "
        "Fewer hops and processes; such a server only serves: `train --remote` cannot train its "
        "modules",
    )
    p.add_argument("--kv-cache-mb", type=float, default=None, help="KV-cache pool per server")
    p.add_argument(
        "--weights",
        choices=["float32", "bfloat16", "int8"],
        default=None,
        help="how module servers store the weights they serve (default float32; bfloat16 holds "
        "half the bytes, int8 about a quarter; see pathways.weights)",
    )
    p.add_argument(
        "--log-dir",
        default=None,
        help="where each process writes its log, <name>.log (default: $PATHWAYS_HOME/logs, "
        "i.e. ~/.pathways/logs)",
    )
    p.add_argument(
        "--no-coordinator",
        action="store_true",
        help="serve only: no broker and no coordinator worker",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC and no API keys (default: a private CA and a certificate per "
        "service under $PATHWAYS_HOME/tls, mutual TLS between every process, and an admin API "
        "key for you in $PATHWAYS_HOME/client.key, which the CLI uses)",
    )
    p.add_argument(
        "--coordinator-processes",
        type=int,
        default=1,
        metavar="N",
        help="pool processes of the coordinator worker, i.e. jobs or job tasks at once "
        "(default 1; `train --parallel diloco --workers K` needs K + 1, `--parallel dipaco` "
        "its paths + 1)",
    )
    p.add_argument(
        "--no-http",
        action="store_true",
        help="no HTTP front (default: the OpenAI-compatible HTTP API beside the gateway)",
    )
    p.add_argument(
        "--http-port", type=int, default=None, help="the HTTP front's port (default: a free one)"
    )
    p.add_argument(
        "--no-metrics",
        action="store_true",
        help="no /metrics side ports on module servers and the gateway (default: each serves "
        "Prometheus metrics on a free port, printed at start)",
    )
    p.set_defaults(func=cmd_up)
    h = sub.add_parser(
        "http-front",
        help="run the OpenAI-compatible HTTP front over a gateway (foreground)",
        description="Serves /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings "
        "and /metrics over a gRPC gateway. TLS towards the gateway as for `generate --gateway`: "
        "the local deployment's certificate for its gateway, else PATHWAYS_TLS_DIR or "
        "PATHWAYS_INSECURE=1. Callers' `Authorization: Bearer KEY` goes to the gateway.",
    )
    from pathways.http import server as http_server

    http_server.add_args(h)
    h.set_defaults(func=cmd_http_front)


def parse_replicas(values: list[str], modules) -> dict[str, int]:
    """--replicas MODULE=N values; a group of --colocate is named as given there ("a,b=2")."""
    out = {}
    for v in values:
        name, _, n = v.partition("=")
        if any(m not in modules for m in name.split(",")):
            raise ValueError(f"--replicas: unknown module {name!r}; known: {', '.join(modules)}")
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--replicas must be MODULE=N with N >= 1; got {v!r}")
        out[name] = int(n)
    return out


def local_deployment(args) -> LocalDeployment:
    """The LocalDeployment `up` runs for its parsed `args` (not started). Its gateway keeps the
    pathway table's runtime changes in the state directory (`local.pathways_file`), so `up` run
    again on the same checkpoint serves them."""
    from pathways.deploy import local
    from pathways.deploy.local import LocalDeployment

    # The example specs (`train --remote` may name them); computed here, not imported from
    # commands_local, which imports this module (tools/cli/imports_test: no cycles).
    examples = Path(__file__).resolve().parents[2] / "examples"

    spec, _ = ckpt.load_spec(args.checkpoint)
    replicas = parse_replicas(args.replicas, spec.modules)
    if args.coordinator_processes < 1:
        raise ValueError(f"--coordinator-processes must be >= 1; got {args.coordinator_processes}")
    extra = ["--kv-cache-mb", str(args.kv_cache_mb)] if args.kv_cache_mb else []
    extra += ["--weights", args.weights] if args.weights else []
    if args.http_port is not None and not 0 < args.http_port < 65536:
        raise ValueError(f"--http-port must be in [1, 65535]; got {args.http_port}")
    log_dir = args.log_dir or local.state_file().parent / "logs"
    return LocalDeployment(
        args.checkpoint,
        replicas,
        colocate=[g.split(",") for g in args.colocate],
        log_dir=log_dir,
        module_args=extra,
        coordinator=not args.no_coordinator,
        worker_concurrency=args.coordinator_processes,
        secure_dir=None if args.insecure else local.state_file().parent,
        http_front=not args.no_http,
        http_port=args.http_port,
        metrics=not args.no_metrics,
        job_roots=[examples],  # `train --remote` may name the example specs
        pathways_file=local.pathways_file(args.checkpoint),
    )


def cmd_up(args) -> int:
    from pathways.serving import signals

    dep = local_deployment(args)
    done = signals.on_stop()
    n = sum(dep.replicas.get(m, 1) for m in dep.servers)
    if args.insecure:
        print(
            "WARNING: --insecure: every process talks plaintext gRPC and the gateway takes no "
            "API keys; anyone who can reach these ports can read and change what they serve",
            file=sys.stderr,
        )
    print(
        f"starting {n} module server(s), a gateway{'' if args.no_http else ', an HTTP front'}"
        f"{'' if args.no_coordinator else ', a broker and a coordinator worker'} "
        f"(logs: {dep.log})...",
        file=sys.stderr,
    )
    print(f"pathway table changes are kept in {dep.pathways_file}", file=sys.stderr)
    try:
        dep.start()
        for m, procs in dep.fleet.servers.items():
            shown = f"{m:<16} {', '.join(p.address for p in procs)}"
            if "," in m:
                shown += "  (one server, one program per step; serves only)"
            print(f"  {shown}", file=sys.stderr)
        if dep.broker is not None:
            print(f"  {'broker':<16} {dep.broker.shown_url}", file=sys.stderr)
        print(f"gateway {dep.gateway}", flush=True)
        if dep.http is not None:
            print(f"http {dep.http.url}/v1  (OpenAI-compatible)", flush=True)
        for name, url in dep.metrics_urls.items():
            print(f"  metrics {name:<16} {url}", file=sys.stderr)
        print(f"try: pathways generate --gateway {dep.gateway} --prompt 'def '", file=sys.stderr)
        while not done.wait(1.0):
            dead = dep.dead()
            if dead:
                print(f"process(es) exited: {', '.join(dead)}; stopping", file=sys.stderr)
                return 1
    finally:
        print("stopping...", file=sys.stderr)
        dep.stop()
    return 0


def generate_via_gateway(args) -> int:
    """`pathways generate --gateway HOST:PORT`: streams tokens from GatewayService.Generate."""
    import grpc

    from pathways import messages
    from pathways.v1 import gateway_pb2, gateway_pb2_grpc
    from tools.cli import connect

    opts = messages.sampling_options(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_new_tokens=args.max_tokens,
        stop=args.stop,
    )
    req = gateway_pb2.GenerateRequest(pathway=args.pathway or "", prompt=args.prompt, sampling=opts)
    gw = connect.gateway(args.gateway)
    with gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        served = None
        echoed = False  # the prompt is echoed once the gateway answers: a refusal prints one line
        try:
            for ev in stub.Generate(req, timeout=args.timeout, metadata=gw.metadata):
                if served is None and ev.routed:
                    served = ev.pathway
                    show_route(served)
                if not echoed:
                    sys.stdout.write(args.prompt)
                    echoed = True
                sys.stdout.write(ev.text)
                sys.stdout.flush()
        except grpc.RpcError as e:
            if echoed:
                sys.stdout.write("\n")
            raise ValueError(f"gateway {gw.address}: {e.code().name}: {e.details()}") from None
    if not echoed:
        sys.stdout.write(args.prompt)
    sys.stdout.write("\n")
    return 0


def show_route(path: str) -> None:
    """Says on stderr which path a DiPaCo router chose for the prompt."""
    print(f"[routed to path {path}]", file=sys.stderr, flush=True)


def cmd_http_front(args) -> int:
    """`pathways http-front`: the HTTP front in this process until SIGTERM/Ctrl-C."""
    from pathways.http import server as http_server

    settings = http_server.settings_from_args(args)
    http_server.run(settings, args.host, args.port, args.grace_s)
    return 0
