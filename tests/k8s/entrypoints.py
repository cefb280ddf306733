"""What a rendered container's process reads from its environment, found by running its code.

`start(container, namespace)` runs the service's own entry point (the module the container's image
starts) in this process, with the container's args and its env resolved as the kubelet would,
up to the call it makes once its settings are parsed, where it is stopped: before it loads weights,
binds a port or connects anywhere. Every read of `os.environ` on the way is recorded. If the
process would exit during start-up instead (a required setting missing or malformed), the error
says why. So a manifest's env is checked against the code without a cluster: a variable set
under a name the code never reads, and a required one missing (the pod would exit at start), are
both caught.

Reads made only later (after the stop point) are not seen; a manifest setting such a variable
needs a later stop point here.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock
from urllib.parse import urlparse

import celery

from pathways import checkpoint
from pathways.http import server as http_server
from pathways.serving import server
from services.coordinator import main as coordinator_main
from services.gateway import main as gateway_main
from services.http_front import main as http_front_main
from services.module_server import main as module_server_main

# Image name (`.../NAME:TAG`) -> the module its PEX runs (services/*/BUILD, pex_binary entry_point).
IMAGES = {
    "module-server": module_server_main,
    "gateway": gateway_main,
    "coordinator": coordinator_main,
    "http-front": http_front_main,
}
# Per entry point: the call it makes right after parsing its settings, (owner, attribute).
STOPS = {
    module_server_main.__name__: (server, "serve"),  # serve(settings)
    gateway_main.__name__: (checkpoint, "load_spec"),  # after every flag and env read
    coordinator_main.__name__: (celery.Celery, "worker_main"),  # the app is configured
    http_front_main.__name__: (http_server, "serve"),  # serve(args): flags and env parsed
}
# The host's own settings must not stand in for a missing one in the manifest.
HOST_PREFIXES = ("PATHWAYS_", "CELERY_")
POD_FIELDS = {"metadata.name": "pod-0", "status.podIP": "10.244.0.2", "spec.nodeName": "node-1"}


class _Stopped(BaseException):  # not Exception: the entry point's own handlers must not catch it
    pass


@dataclass
class Started:
    """An entry point that got through start-up: the variables it read, and the call it reached."""

    entry: str
    env: dict[str, str]  # what the container's env resolved to
    reads: set[str] = field(default_factory=set)
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    broker_url: str | None = None  # coordinator only: the Celery app's broker


def entry_point_or_none(image: str) -> str | None:
    """The module a Pathways image runs (`.../module-server:TAG` -> services.module_server.main)."""
    module = IMAGES.get(image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0])
    return None if module is None else module.__name__


def entry_point(image: str) -> str:
    entry = entry_point_or_none(image)
    if entry is None:
        raise KeyError(f"no entry point known for image {image!r} (known: {', '.join(IMAGES)})")
    return entry


def cpu_cores(quantity: str) -> float:
    q = str(quantity)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


CLI_AUTH = ("VALKEYCLI_AUTH", "REDISCLI_AUTH")  # what valkey-cli authenticates with


def resolve_env(container: dict[str, Any], namespace: str) -> dict[str, str]:
    """The container's env as its process sees it (values, downward-API fields, CPU limits)."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {})
        if "value" in e:  # $(VAR) of a variable defined before is expanded, as the kubelet does
            env[e["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(e["value"])
            )
        elif "secretKeyRef" in ref:  # a stand-in for the Secret's value
            env[e["name"]] = f"secret-{ref['secretKeyRef']['name']}-{ref['secretKeyRef']['key']}"
        elif "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            env[e["name"]] = namespace if path == "metadata.namespace" else POD_FIELDS[path]
        elif "resourceFieldRef" in ref:
            r = ref["resourceFieldRef"]
            kind, _, what = r["resource"].partition(".")
            if what != "cpu":
                raise NotImplementedError(f"env {e['name']}: resourceFieldRef {r['resource']}")
            # The kubelet rounds up to a whole multiple of the divisor.
            amount = cpu_cores(container["resources"][kind]["cpu"]) / cpu_cores(
                r.get("divisor", "1")
            )
            env[e["name"]] = str(max(1, math.ceil(amount)))
        else:
            raise NotImplementedError(f"env {e['name']}: {sorted(ref)} (extend resolve_env)")
    return env


class _Recorder:
    def __init__(self):
        self.reads: set[str] = set()
        self.on = True


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[_Recorder]:
    """os.environ is the host's minus its Pathways/Celery settings, plus `env`; reads recorded."""
    saved = dict(os.environ)
    recorder = _Recorder()
    environ_type = type(os.environ)
    real_getitem = environ_type.__getitem__

    def getitem(self, key):
        if self is os.environ and recorder.on:
            recorder.reads.add(key)
        return real_getitem(self, key)

    for key in [k for k in os.environ if k.startswith(HOST_PREFIXES)]:
        del os.environ[key]
    os.environ.update(env)
    try:
        # Mapping.get, __contains__ and os.getenv all read through __getitem__.
        with mock.patch.object(environ_type, "__getitem__", getitem):
            yield recorder
    finally:
        for key in [k for k in os.environ if k not in saved]:
            del os.environ[key]
        os.environ.update(saved)


def start(container: dict[str, Any], namespace: str) -> Started:
    """Runs `container`'s entry point through start-up (see the module docstring).

    Raises:
      AssertionError: the process would have exited during start-up; the message says why.
    """
    entry = entry_point(container["image"])
    main = next(m.main for m in IMAGES.values() if m.__name__ == entry)
    owner, attr = STOPS[entry]
    env = resolve_env(container, namespace)
    reached: list[tuple[tuple, dict]] = []

    def stop(*args, **kwargs):
        reached.append((args, kwargs))
        raise _Stopped

    err = io.StringIO()
    failure = None
    started = Started(entry, env)
    with _environment(env) as recorder, mock.patch.object(owner, attr, stop):
        try:
            with contextlib.redirect_stderr(err):
                rc = main(list(container.get("args", [])))
            failure = f"main() returned {rc!r}"
        except _Stopped:
            pass
        except SystemExit as e:
            failure = f"exited with code {e.code!r}"
        except Exception as e:
            failure = f"raised {type(e).__name__}: {e}"
        recorder.on = False
        if not failure and entry == coordinator_main.__name__:
            # Not recorded: Celery itself looks at CELERY_BROKER_URL here, the worker only later.
            started.broker_url = reached[0][0][0].conf.broker_url
    if failure:
        stderr = err.getvalue().strip()
        raise AssertionError(
            f"container {container['name']!r} ({entry}) would exit at start: {failure}"
            + (f"\nstderr: {stderr}" if stderr else "")
            + f"\nits env: {env}; its args: {container.get('args', [])}"
        )
    started.reads = recorder.reads
    started.args, started.kwargs = reached[0]
    return started


def check_workloads(docs: list[dict[str, Any]]) -> dict[str, Started]:
    """Starts every Pathways container of the rendered workloads in `docs` (see `start`) and checks
    that each env variable it sets is one its process reads, and that it gets the settings the
    rest of the manifests assume (ports, mount paths, the broker's Service). Returns
    {workload name: Started}.

    Raises:
      AssertionError: naming the workload and what is wrong.
    """
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    out = {}
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        name, namespace = d["metadata"]["name"], d["metadata"]["namespace"]
        (c,) = d["spec"]["template"]["spec"]["containers"]
        if entry_point_or_none(c["image"]) is None:
            # A third-party image (the Valkey broker): configured by args; env only carries a
            # Secret into them ($(VAR)) or to valkey-cli, which the readiness probe runs.
            args = " ".join(c.get("args", []))
            for e in c.get("env", []):
                assert (
                    f"$({e['name']})" in args or e["name"] in CLI_AUTH
                ), f"{name}: env {e['name']} on a container whose reads nobody checks"
            continue
        started = start(c, namespace)
        unread = sorted({e["name"] for e in c.get("env", [])} - started.reads)
        assert not unread, (
            f"{name}: sets {', '.join(unread)}, which {started.entry} does not read at start "
            f"(it reads {', '.join(sorted(k for k in started.reads if k.startswith(HOST_PREFIXES)))})"
        )
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        if started.entry == module_server_main.__name__:
            (settings,) = started.args
            assert settings.port == ports["grpc"], f"{name}: listens on {settings.port}"
            assert settings.checkpoint in mounts, f"{name}: checkpoint {settings.checkpoint}"
            module = d["metadata"]["annotations"]["pathways.dev/module-name"]
            assert settings.module == module, f"{name}: serves {settings.module}"
        elif started.entry == gateway_main.__name__:
            (checkpoint,) = started.args
            assert checkpoint in mounts, f"{name}: checkpoint {checkpoint} is not mounted"
        elif started.entry == http_front_main.__name__:
            (args,) = started.args
            assert args.port == ports["http"], f"{name}: listens on {args.port}"
            assert args.tls_dir in mounts, f"{name}: TLS directory {args.tls_dir} is not mounted"
        elif started.entry == coordinator_main.__name__:
            url = urlparse(started.broker_url or "")
            svc = services.get(url.hostname or "")
            assert svc is not None and url.port in [
                p["port"] for p in svc["spec"]["ports"]
            ], f"{name}: broker {started.broker_url} is no rendered Service's address"
        out[name] = started
    return out
