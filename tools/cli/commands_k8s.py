"""Kubernetes commands: render a kustomize base from a spec, scale one module, show replica status."""

from __future__ import annotations

import sys

from pathways import spec as spec_lib
from pathways.k8s import cluster, pods, render


def register(sub) -> None:
    p = sub.add_parser("k8s", help="Kubernetes manifests for a pathway")
    k8s_sub = p.add_subparsers(dest="k8s_command", required=True, metavar="SUBCOMMAND")
    r = k8s_sub.add_parser(
        "render",
        help="write a kustomize base for a spec (a Deployment per module, gateway, coordinator, "
        "broker, RBAC, policies)",
    )
    r.add_argument("--spec", required=True)
    r.add_argument(
        "--checkpoint-uri",
        default=pods.DEFAULT_CHECKPOINT_URI,
        help="pvc://CLAIM[/SUBPATH] or file:///PATH (default: %(default)s)",
    )
    r.add_argument(
        "--training-uri",
        default=pods.DEFAULT_TRAINING_URI,
        help="writable volume for training output, shared by the coordinator and the module "
        "servers: pvc://CLAIM[/SUBPATH] (ReadWriteMany in production) or file:///PATH "
        "(default: %(default)s)",
    )
    r.add_argument(
        "--gateway-state-uri",
        default=pods.DEFAULT_GATEWAY_STATE_URI,
        help="writable volume where the gateway keeps its pathway table's runtime changes "
        "(--pathways-file, a file per checkpoint URI): pvc://CLAIM[/SUBPATH] (ReadWriteOnce: "
        "one gateway replica writes it) or file:///PATH (default: %(default)s)",
    )
    r.add_argument(
        "--image-registry",
        default=render.DEFAULT_REGISTRY,
        help="prefix of the module-server/gateway/coordinator/http-front images (default: %(default)s)",
    )
    r.add_argument(
        "--colocate",
        action="append",
        default=[],
        metavar="MODULE,MODULE[,...]",
        help="consecutive modules of a pathway that one server hosts and steps as one program, "
        "as pathways up --colocate: one Deployment per group, named after it (repeatable)",
    )
    r.add_argument("--namespace", default=render.DEFAULT_NAMESPACE)
    r.add_argument("--out", required=True, help="directory for the base (stale modules removed)")
    r.set_defaults(func=cmd_render)

    p = sub.add_parser("scale", help="set one module's replica count in a cluster")
    p.add_argument("module", help="the module's name in the spec (or its Deployment name)")
    p.add_argument("--replicas", type=int, required=True, help="desired replica count (>= 0)")
    _cluster_args(p)
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("status", help="desired/ready replicas per module in a cluster")
    _cluster_args(p)
    p.set_defaults(func=cmd_status)


def _cluster_args(p) -> None:
    p.add_argument(
        "--namespace",
        help=f"default: the kubeconfig context's namespace, else {render.DEFAULT_NAMESPACE}",
    )
    p.add_argument("--kubeconfig", help="default: $KUBECONFIG or ~/.kube/config")


def cmd_render(args) -> int:
    spec = spec_lib.load(args.spec)
    files = render.render(
        spec,
        checkpoint_uri=args.checkpoint_uri,
        training_uri=args.training_uri,
        gateway_state_uri=args.gateway_state_uri,
        image_registry=args.image_registry,
        namespace=args.namespace,
        colocate=[g.split(",") for g in args.colocate],
    )
    render.write(files, args.out)
    servers = sum(1 for f in files if f.startswith("modules/"))
    print(
        f"wrote {len(files)} files for {len(spec.modules)} modules ({servers} module servers) "
        f"to {args.out}"
    )
    return 0


def _connect(args):
    api, context_namespace = cluster.connect(args.kubeconfig)
    return api, args.namespace or context_namespace or render.DEFAULT_NAMESPACE


def cmd_scale(args) -> int:
    try:
        api, namespace = _connect(args)
        before = cluster.scale(api, namespace, args.module, args.replicas)
    except cluster.ClusterError as e:
        return _fail("scale", e)
    print(f"{args.module}: replicas {before} -> {args.replicas} (namespace {namespace})")
    bounds = cluster.autoscaler_bounds(api, namespace, args.module)
    if bounds is not None:
        low, high = bounds
        print(
            f"note: a HorizontalPodAutoscaler scales {args.module} between {low} and {high} "
            f"replicas and will move it from {args.replicas} as load changes; set its bounds "
            f"to pin the count",
            file=sys.stderr,
        )
    return 0


def cmd_status(args) -> int:
    try:
        api, namespace = _connect(args)
        rows = cluster.status(api, namespace)
    except cluster.ClusterError as e:
        return _fail("status", e)
    if not rows:
        print(f"no Pathways modules in namespace {namespace}")
        return 0
    width = max(len("MODULE"), *(len(r.module) for r in rows))
    print(f"{'MODULE':<{width}}  DESIRED  READY  UP-TO-DATE")
    for r in rows:
        print(f"{r.module:<{width}}  {r.desired:>7}  {r.ready:>5}  {r.updated:>10}")
    return 0


def _fail(command: str, error: Exception) -> int:
    print(f"pathways {command}: error: {error}", file=sys.stderr)
    return 2
