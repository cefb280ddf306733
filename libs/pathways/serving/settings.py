"""Module-server settings: parsed once from flags or PATHWAYS_* environment variables."""

from __future__ import annotations

import argparse
import dataclasses
import os

from pathways import paths, transport
from pathways.config import positive_int, positive_number
from pathways.weights import STORAGE as WEIGHTS


@dataclasses.dataclass(frozen=True)
class ModuleServerSettings:
    checkpoint: str
    module: str
    port: int = 0  # 0: pick a free port (tests, `pathways up`)
    host: str = "127.0.0.1"
    kv_cache_mb: float = 256.0  # attention modules: KV-cache pool size, shared by all sessions
    max_slots: int = 64  # upper bound on slots whatever the pool size
    max_rows: int = 4096  # embedding/decoding modules: sequences held at once
    session_ttl_s: float = 120.0  # idle sessions are closed after this long
    max_batch: int = 8  # rows per continuous-batching decode step
    # Longest wait for the other sessions' decode steps before running a batch (never waited
    # when only one session is decoding).
    batch_wait_ms: float = 2.0
    max_message_mb: float = 64.0  # bigger requests get RESOURCE_EXHAUSTED from gRPC itself
    grace_s: float = 5.0  # in-flight calls get this long to finish on SIGTERM
    # gRPC handler threads: each open decode stream (session) holds one. Streaming calls may hold
    # all but max(2, workers // 8) of them (limits.StreamSlots); the rest stay for health,
    # reflection and short calls.
    workers: int = 128
    # XLA compute threads (see pathways.cpu); 0: one per CPU the process may use. Servers that
    # share a machine's cores should split them (`launcher` does).
    cpu_threads: int = 0
    # How the served weights are stored (pathways.weights): "float32", "bfloat16" (half the
    # bytes) or "int8" (about a quarter); float32 arithmetic either way (logits move by ~1e-2).
    # The float32 copy is then dropped: a server started to train should keep float32.
    weights: str = "float32"
    # A tensor-parallel mesh, "tp=N": the module's weights and KV cache split over N devices
    # (pathways.sharding; on CPU, N host devices need
    # XLA_FLAGS=--xla_force_host_platform_device_count=N). "": one device.
    mesh: str = ""
    # TLS (see pathways.transport): a directory with ca.crt, tls.crt and tls.key; clients must
    # present a certificate of that CA. Plaintext needs `insecure`; one of the two is required.
    tls_dir: str = ""
    insecure: bool = False
    tls_server_name: str = ""  # peers' certificates are checked against this name, not the host
    # A second port answering only grpc.health.v1, in plaintext (Kubernetes' probes cannot speak
    # TLS), on its own threads; 0: none.
    health_port: int = 0
    # A plaintext port serving GET /metrics (Prometheus' text format); 0: none.
    metrics_port: int = 0
    # Directories TrainingService.Save/Load may touch (os.pathsep-separated); "": the
    # checkpoint's directory, the one holding it, and the working directory (paths.Roots.around).
    path_roots: str = ""
    # Bounds on what one request may cost (limits.py); each violation is answered with
    # INVALID_ARGUMENT or RESOURCE_EXHAUSTED naming the setting.
    max_call_tokens: int = 65536  # rows x positions of one Prefill, Forward or training tensor
    max_micro_batches: int = 256  # TrainingService.RunStep micro_batches
    max_inbox_mb: float = 256.0  # RunStep deliveries held for steps that have not taken them
    max_programs: int = 512  # distinct compiled shapes (programs) per server
    # Resident memory (weights, KV cache, programs) plus the estimated activations of the calls
    # in flight; a call that would exceed it is refused, a server over it at start does not
    # start. 0: 90 % of the machine's (or cgroup's) memory.
    memory_budget_mb: float = 0.0
    # TrainingService is mounted only on a server started to train (issue 17); it trains a copy
    # of the weights of its own, and answers only to these service certificates (common-name
    # patterns, comma-separated). The served weights change only through ModuleService.Publish,
    # which answers only to `publishers` (the gateway, whose Publish needs an admin key).
    training: bool = False
    training_peers: str = "coordinator,module,module-*"  # k8s: module; `up`: module-<name>
    publishers: str = "gateway"

    @property
    def modules(self) -> list[str]:
        """The modules this server hosts: one, or several consecutive ones of a pathway whose
        steps run as one program (`--module a,b`)."""
        return [m.strip() for m in self.module.split(",")]

    def __post_init__(self):
        if not self.checkpoint or not self.module:
            raise ValueError(
                "a module server needs --checkpoint/PATHWAYS_CHECKPOINT and "
                "--module/PATHWAYS_MODULE"
            )
        if any(not m.strip() for m in self.module.split(",")):
            raise ValueError(
                f"module must name one module, or several consecutive ones separated by commas "
                f"(one server, one program per step); got {self.module!r}"
            )
        if self.training and len(self.modules) > 1:
            raise ValueError(
                f"training serves one module per server; module {self.module!r} names "
                f"{len(self.modules)}"
            )
        for name in (
            "max_slots",
            "max_rows",
            "max_batch",
            "max_call_tokens",
            "max_micro_batches",
            "max_programs",
        ):
            positive_int(name, getattr(self, name))
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}; got {self.weights!r}")
        if self.training and self.weights != "float32":
            raise ValueError(
                f"weights {self.weights} drops the float32 copy that training needs: a server "
                f"started with training keeps weights float32"
            )
        if self.mesh:
            from pathways import sharding

            sharding.parse_mesh(self.mesh)  # "mesh must look like tp=N ..."
            if self.weights == "int8":
                raise ValueError("weights int8 is not supported with a mesh (float32 or bfloat16)")
        if self.workers < 3:
            raise ValueError(
                f"workers must be >= 3 (two stay free for health and short calls), got "
                f"{self.workers!r}"
            )
        if self.memory_budget_mb < 0:
            raise ValueError(f"memory_budget_mb must be >= 0, got {self.memory_budget_mb!r}")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be >= 0, got {self.cpu_threads!r}")
        for name in ("kv_cache_mb", "session_ttl_s", "max_message_mb", "max_inbox_mb"):
            positive_number(name, getattr(self, name))
        if self.path_roots:
            self.roots()  # a filesystem root or an empty list is an error now
        for name in ("health_port", "metrics_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)!r}")
        if self.batch_wait_ms < 0 or self.grace_s < 0 or not 0 <= self.port < 65536:
            raise ValueError(
                f"batch_wait_ms, grace_s must be >= 0 and port in [0, 65535]; got "
                f"{self.batch_wait_ms!r}, {self.grace_s!r}, {self.port!r}"
            )
        if bool(self.tls_dir) == self.insecure:
            raise ValueError(
                "a module server needs exactly one of --tls-dir/PATHWAYS_TLS_DIR (a directory "
                "with ca.crt, tls.crt, tls.key) and --insecure/PATHWAYS_INSECURE=1 (plaintext)"
            )

    def stream_reserve(self) -> int:
        """Handler threads streaming calls never take (see limits.StreamSlots)."""
        return max(2, self.workers // 8)

    def roots(self) -> paths.Roots:
        """Where Save/Load may read and write (PathError, a ValueError, for a bad list)."""
        if self.path_roots:
            return paths.Roots.parse(self.path_roots)
        return paths.Roots.around(self.checkpoint)

    def tls(self) -> transport.TLSConfig:
        """The server's TLS settings, read from its files (TLSError, a ValueError, names a file
        that cannot be read)."""
        env = {transport.ENV_DIR: self.tls_dir, transport.ENV_SERVER_NAME: self.tls_server_name}
        if self.insecure:
            env[transport.ENV_INSECURE] = "1"
        return transport.from_env(env, required=True)


def _env_name(field: str) -> str:
    return "PATHWAYS_" + field.upper()


def add_args(p: argparse.ArgumentParser) -> None:
    """Adds one flag per setting; each defaults to its PATHWAYS_<NAME> environment variable."""
    for f in dataclasses.fields(ModuleServerSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):  # a switch: --insecure, or PATHWAYS_INSECURE=1
            p.add_argument(
                flag,
                dest=f.name,
                action="store_const",
                const="1",
                default=None,
                help=f"(env {_env_name(f.name)}=1)",
            )
        else:
            p.add_argument(flag, dest=f.name, default=None, help=f"(env {_env_name(f.name)})")


def from_args(args: argparse.Namespace, env=os.environ) -> ModuleServerSettings:
    values = {}
    for f in dataclasses.fields(ModuleServerSettings):
        raw = getattr(args, f.name, None)
        if raw is None:
            raw = env.get(_env_name(f.name))
        if raw is None:
            continue
        kind = type(f.default) if f.default is not dataclasses.MISSING else str
        if kind is bool:
            values[f.name] = str(raw).lower() in ("1", "true", "yes")
            continue
        try:
            values[f.name] = kind(raw)
        except ValueError:
            raise ValueError(f"{f.name} must be a {kind.__name__}, got {raw!r}") from None
    values.setdefault("checkpoint", "")
    values.setdefault("module", "")
    return ModuleServerSettings(**values)
