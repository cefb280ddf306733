"""The running local deployment's addresses, so that later commands find it.

`pathways up` writes them to $PATHWAYS_HOME/deployment.json (default ~/.pathways) and removes the
file when it stops; `pathways generate --gateway`, `train --remote` and `jobs` read it, with where
the local user's certificate and API key are. Its gateway keeps the pathway table's runtime
changes in the same directory (`pathways_file`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathways.paths import ENV_JOB_ROOTS


def state_file() -> Path:
    return Path(os.environ.get("PATHWAYS_HOME", Path.home() / ".pathways")) / "deployment.json"


PATHWAYS_FILE_ENV = "PATHWAYS_PATHWAYS_FILE"  # the gateway's --pathways-file


def pathways_file(checkpoint: str | Path) -> Path:
    """Where `up`'s gateway keeps its pathway table's changes (AddModule, SetPathway,
    RemovePathway) over `checkpoint`: $PATHWAYS_PATHWAYS_FILE if set, else a file per checkpoint
    in the state directory, $PATHWAYS_HOME/gateway-pathways/NAME-HASH.json. So `up` run again on
    the same checkpoint serves what was changed at runtime, and another checkpoint starts from
    its own spec (a store refuses a file written for another checkpoint)."""
    if os.environ.get(PATHWAYS_FILE_ENV):
        return Path(os.environ[PATHWAYS_FILE_ENV]).absolute()
    ckpt = Path(checkpoint).absolute()  # as serving.pathway_store records it
    digest = hashlib.sha256(str(ckpt).encode()).hexdigest()[:12]
    return state_file().parent / "gateway-pathways" / f"{ckpt.name or 'checkpoint'}-{digest}.json"


def write(info: dict[str, Any]) -> Path:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # Owner-only: it holds the broker's URL with its password.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({**info, "pid": os.getpid()}, indent=1))
    tmp.replace(path)
    return path


def read() -> dict[str, Any] | None:
    """The deployment's addresses, or None when none is running (stale files are ignored)."""
    path = state_file()
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(info.get("pid", -1)), 0)
    except (OSError, ValueError):
        return None  # its `pathways up` is gone
    return info


def remove() -> None:
    path = state_file()
    info = None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    if info and info.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def broker_url(explicit: str | None = None) -> str:
    """--broker, else $PATHWAYS_BROKER_URL, else the running local deployment's broker."""
    if explicit:
        return explicit
    if os.environ.get("PATHWAYS_BROKER_URL"):
        return os.environ["PATHWAYS_BROKER_URL"]
    info = read()
    if info and info.get("broker"):
        return info["broker"]
    raise ValueError(
        "no coordinator found: start one with `pathways up`, or pass --broker URL "
        "(or set PATHWAYS_BROKER_URL)"
    )


def server_names(spec, modules: list[str], colocate: Sequence[Sequence[str]]) -> list[str]:
    """The module servers of a deployment: each module alone, except the groups of `colocate`,
    each one server named "a,b" (in pathway order). Raises ValueError naming a group that is not
    consecutive modules of one of the spec's pathways, or whose contracts do not chain."""
    from pathways.serving.chain import check_contracts

    grouped: dict[str, str] = {}
    for group in colocate:
        group = [m.strip() for m in group]
        shown = ",".join(group)
        if len(group) < 2:
            raise ValueError(f"colocate: a group names 2 or more modules; got {shown!r}")
        for m in group:
            if m not in modules:
                raise ValueError(
                    f"colocate: unknown module {m!r} in {shown!r}; known: {', '.join(modules)}"
                )
            if m in grouped:
                raise ValueError(f"colocate: module {m!r} is in two groups ({grouped[m]!r})")
        if not any(
            list(p.modules[i : i + len(group)]) == group
            for p in spec.pathways.values()
            for i in range(len(p.modules))
        ):
            raise ValueError(
                f"colocate: {shown!r} are not consecutive modules of any pathway of the spec "
                f"(in order)"
            )
        check_contracts([(m, spec.modules[m]) for m in group])
        grouped.update({m: shown for m in group})
    names: list[str] = []
    for m in modules:
        name = grouped.get(m, m)
        if name not in names:
            names.append(name)
    return names


class LocalDeployment:
    """Module servers, a gateway, an embedded broker and a coordinator worker, as local processes.

    What `pathways up` and `pathways demo` run. `stop()` ends every process it started. Each
    process writes its output to `<log_dir>/<name>.log` (a temporary file removed at the end when
    `log_dir` is None); one that dies while starting stops the others, and the StartupError names
    it with its exit code and the end of its log.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        replicas: dict[str, int] | None = None,
        log_dir: str | Path | None = None,
        module_args: list[str] = (),
        coordinator: bool = True,
        worker_concurrency: int = 1,
        secure_dir: str | Path | None = None,
        http_front: bool = False,
        http_port: int | None = None,
        metrics: bool = False,
        training: bool = True,
        job_roots: Sequence[str | Path] = (),
        colocate: Sequence[Sequence[str]] = (),
        pathways_file: str | Path | None = None,
    ):
        """`secure_dir`: where the deployment keeps its CA and service certificates (`tls/`),
        the gateway's hashed API keys (`api-keys.json`) and the local user's admin key
        (`client.key`, owner-only); every process then talks mutual TLS and the gateway asks
        for keys. None: plaintext and no keys (tests on loopback; `--insecure`).
        `http_front`: also the OpenAI-compatible HTTP front over the gateway, on `http_port`
        (None: a free port); it reaches the gateway with its own certificate (`http-front`).
        `metrics`: module servers and the gateway serve GET /metrics on side ports (the HTTP
        front always does, on its own port). `training`: module servers start with --training
        (TrainingService on a copy of the weights, for jobs through the services; what they
        learn is served after `publish`). `job_roots`: directories the coordinator's jobs may
        read and write besides the working directory, the checkpoint's, the one holding it, the
        log and secure directories (PATHWAYS_JOB_ROOTS of its worker; e.g. where specs ship).
        `colocate`: groups of consecutive modules of a pathway that one server hosts and steps as
        one program (e.g. [["attn-0", "attn-1"]]); `replicas` then names the group
        ("attn-0,attn-1"). Such a server serves only: jobs through the services cannot train its
        modules (`train_modules` leaves them out). `pathways_file`: the gateway keeps its pathway
        table's changes there and applies them when it starts again (`--pathways-file`; `up`
        gives `pathways_file(checkpoint)`); None: they last until the gateway stops."""
        from pathways import certs
        from pathways import checkpoint as ckpt

        self.checkpoint = str(checkpoint)
        spec, _ = ckpt.load_spec(self.checkpoint)
        self.modules = [m for m in spec.modules if ckpt.has_module(self.checkpoint, m)]
        if not self.modules:
            raise ValueError(f"checkpoint {self.checkpoint} has no module weights")
        self.servers = server_names(spec, self.modules, colocate)
        self.replicas, self.module_args = dict(replicas or {}), list(module_args)
        for name in self.replicas:
            if name not in self.servers:
                group = next((g for g in self.servers if name in g.split(",")), None)
                raise ValueError(
                    f"replicas: {name!r} is not a server of this deployment"
                    + (f"; it is hosted with others, name the group {group!r}" if group else "")
                )
        if training and "--training" not in self.module_args:
            self.module_args.append("--training")
        self.job_roots = list(job_roots)
        self.log = Path(log_dir) if log_dir is not None else None
        self.coordinator, self.worker_concurrency = coordinator, worker_concurrency
        self.fleet = None
        self.with_http, self.http_port, self.http = http_front, http_port, None
        self.metrics = metrics
        self.broker = None
        self.worker = None
        self.secure_dir = None if secure_dir is None else Path(secure_dir)
        self.pathways_file = None if pathways_file is None else Path(pathways_file).absolute()
        self.identities = certs.Identities(
            None if self.secure_dir is None else self.secure_dir / "tls"
        )

    @property
    def client_tls_dir(self) -> str | None:
        """The local user's certificate directory (None in plaintext)."""
        from pathways import certs

        return None if self.secure_dir is None else str(self.secure_dir / "tls" / certs.CLIENT)

    @property
    def api_key_file(self) -> Path | None:
        return None if self.secure_dir is None else self.secure_dir / "client.key"

    def _gateway_args(self) -> list[str]:
        """The gateway's flags: AddModule may dial this machine's servers only; its pathways
        file, if any; with keys, a new admin key for the local user (the keys file keeps the
        other keys it holds)."""
        args = ["--allow-module-address", "127.0.0.1:*"]
        if self.pathways_file is not None:
            args += ["--pathways-file", str(self.pathways_file)]
        if self.secure_dir is None:
            return args
        from pathways import certs
        from pathways.serving import auth

        keys_file = self.secure_dir / "api-keys.json"
        store = auth.KeyStore.load(keys_file) if keys_file.exists() else auth.KeyStore([])
        key = auth.new_key()
        store.entries = [e for e in store.entries if e.name != "local-admin"]
        store.entries.append(auth.hashed("local-admin", "admin", key))
        store.save(keys_file)
        certs.write_private(self.api_key_file, (key + "\n").encode())
        return [*args, "--api-keys", str(keys_file)]

    @property
    def gateway(self) -> str:
        return self.fleet.gateway.address

    @property
    def metrics_urls(self) -> dict[str, str]:
        """Process name -> its /metrics URL (the HTTP front's included)."""
        urls = dict(self.fleet.metrics_urls) if self.fleet is not None else {}
        if self.http is not None:
            urls["http-front"] = f"{self.http.url}/metrics"
        return urls

    def worker_roots(self) -> str:
        """PATHWAYS_JOB_ROOTS of the coordinator worker (see `job_roots`)."""
        ckpt = Path(self.checkpoint).absolute()
        dirs = [Path.cwd(), ckpt, ckpt.parent, self.log, self.secure_dir, *self.job_roots]
        keep = [str(Path(d).absolute()) for d in dirs if d is not None]
        return os.pathsep.join(d for d in dict.fromkeys(keep) if Path(d) != Path(Path(d).anchor))

    def publish(self, checkpoint: str | Path | None = None, modules=(), timeout: float = 300):
        """Admin: every replica of `modules` (none: all) serves the weights of `checkpoint`, or
        (None) of its training copy, through the gateway's Publish (with the local user's key).
        Returns the "module@address" published."""
        from pathways import transport
        from pathways.serving import auth
        from pathways.v1 import gateway_pb2, gateway_pb2_grpc

        tls = (
            transport.TLSConfig.plaintext()
            if self.client_tls_dir is None
            else transport.TLSConfig.from_dir(self.client_tls_dir)
        )
        key = self.api_key_file.read_text().strip() if self.api_key_file is not None else None
        req = gateway_pb2.PublishModulesRequest(
            modules=list(modules),
            checkpoint="" if checkpoint is None else str(Path(checkpoint).absolute()),
            from_training=checkpoint is None,
        )
        with transport.channel(self.gateway, tls=tls) as ch:
            r = gateway_pb2_grpc.GatewayServiceStub(ch).Publish(
                req, timeout=timeout, metadata=auth.client_metadata(key)
            )
        return list(r.published)

    @property
    def train_modules(self) -> dict[str, str]:
        """The replica of each module that trains (the first): module -> host:port. Modules
        hosted several to a server (`colocate`) only serve: they are not listed."""
        return {m: ps[0].address for m, ps in self.fleet.servers.items() if "," not in m}

    def _compile_cache(self) -> dict[str, str]:
        """The worker's jobs keep compiled programs beside the deployment's logs (a second job
        of the same shapes, or a resumed one, loads them); none without a log directory."""
        from pathways.coordinator.worker import ENV_COMPILE_CACHE

        if self.log is None:
            return {}
        return {ENV_COMPILE_CACHE: str((self.log / "xla-cache").absolute())}

    def start(self, timeout: float = 300.0) -> LocalDeployment:
        from pathways import certs
        from pathways.coordinator.broker import EmbeddedBroker
        from pathways.deploy.launcher import Fleet, start_worker

        try:
            if self.coordinator:
                workdir = self.log / "broker" if self.log is not None else None
                self.broker = EmbeddedBroker(workdir=workdir).start()
                # The worker first: it imports while the module servers compile.
                self.worker = start_worker(
                    self.broker.url,
                    concurrency=self.worker_concurrency,
                    log=self.log,
                    tls=self.identities.tls(certs.COORDINATOR),
                    env={ENV_JOB_ROOTS: self.worker_roots(), **self._compile_cache()},
                )
            self.fleet = Fleet(
                self.checkpoint,
                self.servers,
                self.replicas,
                log=self.log,
                module_args=self.module_args,
                identities=self.identities,
                gateway_args=self._gateway_args(),
                metrics=self.metrics,
            )
            self.fleet.start(timeout, also=[self.worker] if self.worker else [])
            if self.with_http:
                from pathways.deploy.launcher import start_http_front, wait_http_ready

                self.http = start_http_front(
                    self.gateway,
                    log=self.log,
                    port=self.http_port,
                    tls=self.identities.tls("http-front"),
                )
                wait_http_ready(self.http, timeout, also=[self.worker] if self.worker else [])
            if self.worker is not None:
                self.worker.check()
            write(
                {
                    "gateway": self.gateway,
                    "http": self.http.url if self.http is not None else None,
                    "metrics": self.metrics_urls,
                    "broker": self.broker.url if self.broker else None,
                    "modules": self.fleet.endpoints,
                    "train_modules": self.train_modules,
                    # Modules hosted several to a server: they serve only (see `colocate`).
                    "serve_only": [m for s in self.servers if "," in s for m in s.split(",")],
                    "checkpoint": self.checkpoint,
                    # How the CLI talks to it: the local user's certificate and admin key.
                    "insecure": self.secure_dir is None,
                    "tls": self.client_tls_dir,
                    "api_key_file": None if self.api_key_file is None else str(self.api_key_file),
                }
            )
        except BaseException:
            self.stop()
            raise
        return self

    def add_module(self, checkpoint: str | Path, name: str, timeout: float = 300.0) -> str:
        """Starts a module server for module `name` of `checkpoint`; returns its address.

        The gateway does not know it yet: register it with GatewayService.AddModule
        (`pathways pathways add-module NAME ADDRESS`).
        """
        from pathways import certs
        from pathways.deploy.launcher import start_module, wait_healthy

        servers = sum(len(ps) for ps in self.fleet.servers.values()) + 1
        proc = start_module(
            str(checkpoint),
            name,
            self.fleet.server_env(servers),
            log=self.log,
            extra_args=self.module_args,
            replica=len(self.fleet.servers.get(name, [])),
            tls=self.identities.tls(certs.module_identity(name)),
        )
        try:
            wait_healthy(proc.address, proc, timeout, tls=self.fleet.client_tls)
        except BaseException:
            proc.stop()
            raise
        self.fleet.servers.setdefault(name, []).append(proc)
        return proc.address

    def dead(self) -> list[str]:
        """Names of processes that exited on their own."""
        out = [
            p.name for ps in self.fleet.servers.values() for p in ps if p.proc.poll() is not None
        ]
        if self.fleet.gateway is not None and self.fleet.gateway.proc.poll() is not None:
            out.append("gateway")
        if self.http is not None and self.http.proc.poll() is not None:
            out.append("http-front")
        if self.worker is not None and self.worker.proc.poll() is not None:
            out.append("coordinator-worker")
        return out

    def stop(self) -> None:
        remove()
        if self.worker is not None and self.worker.proc.poll() is None:
            self.worker.proc.terminate()  # first, so it drains while the servers stop
        if self.http is not None:
            self.http.stop()  # before the gateway, whose streams it holds
        if self.fleet is not None:
            self.fleet.stop()
        if self.worker is not None:
            self.worker.stop(timeout=30.0)  # warm shutdown: a running job is requeued, not lost
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
