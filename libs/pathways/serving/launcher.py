"""Starts module servers and a gateway as local processes on free loopback ports (tests, `up`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def cpu_share(servers: int) -> int:
    """XLA threads per server when `servers` module servers share this machine's CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // max(1, servers))


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
    env["PYTHONPATH"] = os.pathsep.join(str(Path(p).absolute()) for p in sys.path if p)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(extra or {})
    return env


def wait_healthy(
    address: str, proc: subprocess.Popen | None = None, timeout: float = 180.0, service: str = ""
) -> None:
    """Blocks until `address` reports SERVING; raises if `proc` exits or time runs out."""
    end = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server for {address} exited with code {proc.returncode}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"{address} not SERVING after {timeout:.0f} s")
            time.sleep(0.2)


class Process:
    """One server process; `stop()` sends SIGTERM (graceful) and kills it if it lingers."""

    def __init__(self, name: str, argv: list[str], port: int, env=None, log=None):
        self.name, self.port, self.address = name, port, f"127.0.0.1:{port}"
        out = log if log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *argv], env=child_env(env), stdout=out, stderr=subprocess.STDOUT
        )

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """Abrupt death (failover tests)."""
        self.proc.kill()
        self.proc.wait()


def start_module(
    checkpoint: str, module: str, env=None, log=None, extra_args: list[str] = ()
) -> Process:
    port = free_port()
    return Process(
        module,
        [
            "services.module_server.main",
            "--checkpoint",
            str(checkpoint),
            "--module",
            module,
            "--port",
            str(port),
            *extra_args,
        ],
        port,
        env,
        log,
    )


def start_gateway(
    checkpoint: str, endpoints: dict[str, list[str]], env=None, log=None, extra_args: list[str] = ()
) -> Process:
    port = free_port()
    argv = ["services.gateway.main", "--checkpoint", str(checkpoint), "--port", str(port)]
    for m, addrs in endpoints.items():
        argv += ["--module", f"{m}={','.join(addrs)}"]
    return Process("gateway", [*argv, *extra_args], port, env, log)


class Fleet:
    """Every module of a checkpoint (N replicas each) and optionally a gateway, as processes."""

    def __init__(
        self,
        checkpoint: str,
        modules: list[str],
        replicas: dict[str, int] | None = None,
        gateway: bool = True,
        env=None,
        log=None,
        module_args: list[str] = (),
    ):
        self.checkpoint, self.modules = str(checkpoint), modules
        self.replicas, self.with_gateway = dict(replicas or {}), gateway
        self.env, self.log, self.module_args = env, log, list(module_args)
        self.servers: dict[str, list[Process]] = {}
        self.gateway: Process | None = None

    @property
    def endpoints(self) -> dict[str, list[str]]:
        return {m: [p.address for p in ps] for m, ps in self.servers.items()}

    def server_env(self, servers: int) -> dict[str, str]:
        """Environment of the module servers: the machine's CPUs split between `servers`
        (unless PATHWAYS_CPU_THREADS is set here or in `env`)."""
        env = dict(self.env or {})
        if "PATHWAYS_CPU_THREADS" not in env and "PATHWAYS_CPU_THREADS" not in os.environ:
            env["PATHWAYS_CPU_THREADS"] = str(cpu_share(servers))
        return env

    def start(self, timeout: float = 300.0) -> Fleet:
        try:
            env = self.server_env(sum(self.replicas.get(m, 1) for m in self.modules))
            for m in self.modules:
                self.servers[m] = [
                    start_module(self.checkpoint, m, env, self.log, self.module_args)
                    for _ in range(self.replicas.get(m, 1))
                ]
            for ps in self.servers.values():
                for p in ps:
                    wait_healthy(p.address, p.proc, timeout)
            if self.with_gateway:
                self.gateway = start_gateway(self.checkpoint, self.endpoints, self.env, self.log)
                wait_healthy(self.gateway.address, self.gateway.proc, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        procs = [p for ps in self.servers.values() for p in ps]
        if self.gateway is not None:
            procs.insert(0, self.gateway)
        for p in procs:  # signal all first so they drain in parallel
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            p.stop()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
