"""Starts module servers and a gateway as local processes on free loopback ports (tests, `up`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pathways import certs, transport


def cpus() -> int:
    """The CPUs this process may run on."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, n or 1)


def cpu_share(servers: int) -> int:
    """XLA threads per server when `servers` module servers split this machine's CPUs."""
    return max(1, cpus() // max(1, servers))


_given: set[int] = set()  # ports free_port() handed out (their servers may not listen yet)
_given_lock = threading.Lock()


def free_port() -> int:
    """A loopback port free now and never handed out before by this process: the kernel may
    offer a port again until its server binds it, and the servers of a fleet start at once."""
    with _given_lock:
        for _ in range(1000):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _given:
                _given.add(port)
                return port
    raise RuntimeError("no free loopback port found")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with its import path made absolute for the children."""
    env = dict(os.environ)
    extra = dict(extra or {})
    # The child's own TLS choice replaces this process's (the two settings exclude each other).
    if transport.ENV_DIR in extra:
        env.pop(transport.ENV_INSECURE, None)
    if transport.ENV_INSECURE in extra:
        env.pop(transport.ENV_DIR, None)
    env["PYTHONPATH"] = os.pathsep.join(str(Path(p).absolute()) for p in sys.path if p)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(extra)
    return env


def _with_tls(env: dict[str, str] | None, tls: transport.TLSConfig | None) -> dict[str, str]:
    """`env` plus the TLS settings of a service (`tls`; None: plaintext), unless `env` already
    chooses (services refuse to start without an explicit choice)."""
    env = dict(env or {})
    if transport.ENV_DIR not in env and transport.ENV_INSECURE not in env:
        env.update((tls or transport.TLSConfig.plaintext()).env())
    return env


class StartupError(ChildProcessError):
    """A launched process died or never became healthy while starting (an OSError, so the CLI
    reports it as one error, not a traceback)."""


def wait_healthy(
    address: str,
    proc: subprocess.Popen | Process | None = None,
    timeout: float = 180.0,
    service: str = "",
    tls: transport.TLSConfig | None = None,
) -> None:
    """Blocks until `address` reports SERVING; raises StartupError if `proc` exits (naming it,
    with its exit code and the end of its log when it is a `Process`) or time runs out. `tls`:
    the client side's settings (default: this process's)."""
    if isinstance(proc, Process):
        return wait_all_healthy([proc], timeout, service, tls=tls)
    end = time.monotonic() + timeout
    with transport.channel(address, tls=tls) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while not _serving(stub, service):
            if proc is not None and proc.poll() is not None:
                raise StartupError(f"server for {address} exited with code {proc.returncode}")
            if time.monotonic() > end:
                raise StartupError(f"{address} not SERVING after {timeout:.0f} s")
            time.sleep(0.2)


def wait_all_healthy(
    procs: list[Process],
    timeout: float = 180.0,
    service: str = "",
    also: list[Process] = (),
    tls: transport.TLSConfig | None = None,
) -> None:
    """Blocks until every process in `procs` reports SERVING. Raises StartupError as soon as
    one of them, or of `also` (processes without a health service, e.g. a worker), exits.
    `tls`: the client side's settings (default: this process's)."""
    end = time.monotonic() + timeout
    channels = {p: transport.channel(p.address, tls=tls) for p in procs}
    try:
        pending = dict(channels)
        while pending:
            for p in [*procs, *also]:
                p.check()
            for p, ch in list(pending.items()):
                if _serving(health_pb2_grpc.HealthStub(ch), service):
                    del pending[p]
            if pending and time.monotonic() > end:
                late = ", ".join(f"{p.label} at {p.address}" for p in pending)
                raise StartupError(f"not SERVING after {timeout:.0f} s: {late}")
            if pending:
                time.sleep(0.2)
    finally:
        for ch in channels.values():
            ch.close()


def _serving(stub, service: str) -> bool:
    try:
        r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
    except grpc.RpcError:
        return False
    return r.status == health_pb2.HealthCheckResponse.SERVING


# What every launched process runs: `python -m MODULE` with this process's import path. The
# names are string literals on purpose: Pants infers a dependency from each (python-infer
# string_imports), so any artifact that holds the launcher holds every process it launches.
MODULE_SERVER = "services.module_server.main"
GATEWAY = "services.gateway.main"
COORDINATOR_WORKER = "services.coordinator.main"
HTTP_FRONT = "services.http_front.main"


class Process:
    """One launched process (`python -m argv[0] argv[1:]`); `stop()` sends SIGTERM (graceful)
    and kills it if it lingers.

    Its output goes to `log`: a directory (the process writes `<log>/<name>.log`), an open binary
    file (shared with others), or None (a private temporary file, removed by `stop()`). Either
    way a process that dies while starting is reported with the end of what it wrote.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int | None = None,
        env=None,
        log=None,
        label: str | None = None,
    ):
        self.name, self.port = name, port
        self.address = f"127.0.0.1:{port}" if port is not None else ""
        self.label = label or name
        self._temp_log = log is None
        if log is None or isinstance(log, str | Path):
            if log is None:
                fd, path = tempfile.mkstemp(prefix=f"pathways-{name}-", suffix=".log")
                out = os.fdopen(fd, "wb")
            else:
                Path(log).mkdir(parents=True, exist_ok=True)
                path = Path(log) / f"{name}.log"
                out = path.open("wb")
            self.log_path: Path | None = Path(path)
        else:
            out, self.log_path = log, Path(log.name) if isinstance(log.name, str) else None
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *argv],
                env=child_env(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            if out is not log:
                out.close()  # the child holds its own descriptor

    def tail(self, lines: int = 15) -> str:
        """The last `lines` lines of the process's log ('' when it has none)."""
        if self.log_path is None:
            return ""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check(self) -> None:
        """Raises StartupError if the process has exited, with its exit code and log's end."""
        if self.proc.poll() is None:
            return
        msg = f"{self.label} exited with code {self.proc.returncode} while starting"
        if not self._temp_log and self.log_path is not None:
            msg += f" (log: {self.log_path})"
        if tail := self.tail():
            msg += "; the end of its log:\n" + "\n".join(f"  | {ln}" for ln in tail.splitlines())
        raise StartupError(msg)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._temp_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """Abrupt death (failover tests)."""
        self.proc.kill()
        self.proc.wait()


def start_module(
    checkpoint: str,
    module: str,
    env=None,
    log=None,
    extra_args: list[str] = (),
    replica: int = 0,
    tls: transport.TLSConfig | None = None,
) -> Process:
    """A module server for `module` of `checkpoint` on a free port, with `tls` (None: plaintext
    unless `env` sets PATHWAYS_TLS_DIR or PATHWAYS_INSECURE)."""
    port = free_port()
    name = module.replace(",", "+")  # a server hosting several modules: "attn-0+attn-1"
    return Process(
        name if replica == 0 else f"{name}.{replica}",
        [
            MODULE_SERVER,
            "--checkpoint",
            str(checkpoint),
            "--module",
            module,
            "--port",
            str(port),
            *extra_args,
        ],
        port,
        _with_tls(env, tls),
        log,
        label=f"module server {module!r}" + (f" (replica {replica + 1})" if replica else ""),
    )


def start_gateway(
    checkpoint: str,
    endpoints: dict[str, list[str]],
    env=None,
    log=None,
    extra_args: list[str] = (),
    tls: transport.TLSConfig | None = None,
) -> Process:
    """A gateway over `endpoints` on a free port, with `tls` (None: plaintext, as start_module)."""
    port = free_port()
    argv = [GATEWAY, "--checkpoint", str(checkpoint), "--port", str(port)]
    for m, addrs in endpoints.items():
        argv += ["--module", f"{m}={','.join(addrs)}"]
    env = _with_tls(env, tls)
    return Process("gateway", [*argv, *extra_args], port, env, log, label="gateway")


def start_worker(
    broker_url: str,
    *,
    concurrency: int = 1,
    queues: str | None = None,
    log=None,
    tls: transport.TLSConfig | None = None,
    env: dict[str, str] | None = None,
):
    """A coordinator (Celery) worker on `broker_url`; `tls`: its settings towards the module
    servers (None: plaintext); `env`: more of its environment (e.g. PATHWAYS_JOB_ROOTS)."""
    argv = [COORDINATOR_WORKER, "--loglevel=WARNING", f"--concurrency={concurrency}"]
    if queues:
        argv += ["--queues", queues]
    env = _with_tls({**(env or {}), "PATHWAYS_BROKER_URL": broker_url}, tls)
    return Process("coordinator", argv, None, env, log, label="coordinator worker")


def start_http_front(
    gateway: str,
    env=None,
    log=None,
    port: int | None = None,
    tls: transport.TLSConfig | None = None,
    extra_args: list[str] = (),
) -> Process:
    """The OpenAI-compatible HTTP front over `gateway` on `port` (None: a free one), reaching
    the gateway with `tls` (None: plaintext). Ready when `wait_http_ready` says so."""
    port = free_port() if port is None else port
    argv = [HTTP_FRONT, "--gateway", gateway, "--port", str(port), *extra_args]
    p = Process("http-front", argv, port, _with_tls(env, tls), log, label="http front")
    p.url = f"http://127.0.0.1:{port}"
    return p


def wait_http_ready(proc: Process, timeout: float = 60.0, also: list[Process] = ()) -> None:
    """Blocks until `proc`'s GET /readyz answers 200 (its gateway is SERVING); StartupError
    when it (or one of `also`) exits, or after `timeout`."""
    import urllib.error
    import urllib.request

    end = time.monotonic() + timeout
    while True:
        for p in [proc, *also]:
            p.check()
        try:
            with urllib.request.urlopen(f"{proc.url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > end:
            raise StartupError(f"{proc.label} at {proc.url} not ready after {timeout:.0f} s")
        time.sleep(0.2)


def stop_all(procs: list[Process]) -> None:
    """SIGTERM to all first, so they drain in parallel; then wait for (or kill) each."""
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    for p in procs:
        p.stop()


class Fleet:
    """Every module of a checkpoint (N replicas each) and optionally a gateway, as processes.

    `modules` names servers: a module, or consecutive modules hosted by one server that steps
    them as one program ("attn-0,attn-1"); `replicas` is keyed the same way."""

    def __init__(
        self,
        checkpoint: str,
        modules: list[str],
        replicas: dict[str, int] | None = None,
        gateway: bool = True,
        env=None,
        log=None,
        module_args: list[str] = (),
        identities: certs.Identities | None = None,
        gateway_args: list[str] = (),
        metrics: bool = False,
        split_cpus: bool = False,
    ):
        """`metrics`: every module server and the gateway serve GET /metrics on a free side
        port (`metrics_urls`: process name -> URL). `split_cpus`: see `server_env`."""
        self.checkpoint, self.modules = str(checkpoint), modules
        self.metrics, self.metrics_urls = metrics, {}
        # Each service's certificate (None: every process in plaintext); this process checks
        # their health as the local user's client.
        self.identities = identities or certs.Identities(None)
        self.client_tls = self.identities.tls(certs.CLIENT)
        self.replicas, self.with_gateway = dict(replicas or {}), gateway
        self.env, self.log, self.module_args = env, log, list(module_args)
        self.split_cpus = split_cpus
        self.gateway_args = list(gateway_args)  # extra gateway flags (`up`: its API keys)
        self.servers: dict[str, list[Process]] = {}
        self.gateway: Process | None = None

    @property
    def endpoints(self) -> dict[str, list[str]]:
        # A server hosting several modules ("attn-0,attn-1": one chain) is listed for each.
        return {
            m: [p.address for p in ps] for name, ps in self.servers.items() for m in name.split(",")
        }

    def server_args(self, server: str) -> list[str]:
        """A module server's flags: `module_args`, less --training for a server hosting several
        modules (training serves one module per server; a chain server only serves)."""
        if "," not in server:
            return list(self.module_args)
        return [a for a in self.module_args if a != "--training"]

    def server_env(self, servers: int) -> dict[str, str]:
        """Environment of the module servers. Each computes with all the machine's CPUs (XLA's
        default), unless PATHWAYS_CPU_THREADS is set here or in `env`, or the fleet splits them
        (`split_cpus`: CPUs / `servers` each). A pathway's hops run one after another, and the
        gateway's lockstep moves concurrent sessions through them together, so mostly one server
        computes at a time and a split leaves the other shares idle: GPT-2 small's 4 servers on 2
        cores decoded 13.2 tok/s for one session and 32.1 for 8 with one thread each, 26.7 and
        103.8 with two (BENCHMARKS.md, "Two XLA threads per server"). Split where several
        pathways keep different servers busy at once."""
        env = dict(self.env or {})
        if (
            self.split_cpus
            and "PATHWAYS_CPU_THREADS" not in env
            and "PATHWAYS_CPU_THREADS" not in os.environ
        ):
            env["PATHWAYS_CPU_THREADS"] = str(cpu_share(servers))
        return env

    def start(self, timeout: float = 300.0, also: list[Process] = ()) -> Fleet:
        """Starts every server and waits until all are SERVING. If one dies while starting (or
        one of `also`, processes started beside the fleet), every server is stopped and
        StartupError names the one that died."""
        try:
            env = self.server_env(sum(self.replicas.get(m, 1) for m in self.modules))
            for m in self.modules:
                tls = self.identities.tls(certs.module_identity(m))
                name = m.replace(",", "+")
                self.servers[m] = [
                    start_module(
                        self.checkpoint,
                        m,
                        env,
                        self.log,
                        [*self.server_args(m), *self._metrics_args(name + (f".{i}" if i else ""))],
                        replica=i,
                        tls=tls,
                    )
                    for i in range(self.replicas.get(m, 1))
                ]
            servers = [p for ps in self.servers.values() for p in ps]
            wait_all_healthy(servers, timeout, also=also, tls=self.client_tls)
            if self.with_gateway:
                self.gateway = start_gateway(
                    self.checkpoint,
                    self.endpoints,
                    self.env,
                    self.log,
                    [*self.gateway_args, *self._metrics_args("gateway")],
                    tls=self.identities.tls(certs.GATEWAY),
                )
                wait_all_healthy([self.gateway], timeout, also=also, tls=self.client_tls)
        except BaseException:
            self.stop()
            raise
        return self

    def _metrics_args(self, name: str) -> list[str]:
        if not self.metrics:
            return []
        port = free_port()
        self.metrics_urls[name] = f"http://127.0.0.1:{port}/metrics"
        return ["--metrics-port", str(port)]

    def stop(self) -> None:
        procs = [p for ps in self.servers.values() for p in ps]
        if self.gateway is not None:
            procs.insert(0, self.gateway)
        stop_all(procs)

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
