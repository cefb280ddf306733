"""Module server bootstrap: gRPC server + health + reflection, weight loading, warm-up, SIGTERM."""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
import jax
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pathways import checkpoint as ckpt
from pathways import codec, cpu, paths, sharding, telemetry, transport
from pathways.modules import registry
from pathways.serving import auth, chain, limits, signals
from pathways.serving.engine import ModuleEngine
from pathways.serving.errors import NotFound
from pathways.serving.servicer import ModuleServicer
from pathways.serving.sessions import SessionTable
from pathways.serving.settings import ModuleServerSettings
from pathways.v1 import module_pb2, module_pb2_grpc

log = logging.getLogger(__name__)
SERVICE = module_pb2.DESCRIPTOR.services_by_name["ModuleService"].full_name
# Calls that hold a handler thread for as long as their client keeps them open (or wait on other
# servers): limits.StreamSlots keeps threads free of them (add-ons name their own).
STREAMING_METHODS = (f"/{SERVICE}/DecodeStream",)


@dataclasses.dataclass(frozen=True)
class Mount:
    """What an add-on gets from the module server: the served modules' engines and the servicer,
    the options and TLS settings of its own channels to other servers, and the directories it may
    read and write for its callers."""

    engines: tuple[ModuleEngine, ...]
    servicer: ModuleServicer
    channel_options: list
    tls: transport.TLSConfig
    roots: paths.Roots
    settings: ModuleServerSettings  # the server's limits apply to the add-on's calls too


@dataclasses.dataclass(frozen=True)
class AddOn:
    """A service mounted beside ModuleService on the module server's port (training, which lives
    outside serving/): its full name, for reflection, `add(grpc_server, mount)`, called once
    the weights are loaded, before the server starts, and its methods that hold a handler thread
    while open (streams, calls that wait on other servers: "/package.Service/Method")."""

    name: str
    add: Callable[[grpc.Server, Mount], None]
    streaming_methods: tuple[str, ...] = ()


def slot_count(cfgs, s: ModuleServerSettings) -> int:
    """Slots the KV-cache cap allows for the modules a server hosts (a config, or several
    hosting one chain: a session takes the same slot in each): each holds one sequence of
    max_seq_len positions in every module that keeps a cache."""
    cfgs = cfgs if isinstance(cfgs, list | tuple) else [cfgs]
    per_slot = 0
    for cfg in cfgs:
        kind = registry.of(cfg)
        if kind.has_cache:
            # The bytes of one slot of the kind's own cache, from its shapes (nothing allocated).
            one = jax.eval_shape(lambda kind=kind, cfg=cfg: kind.empty_cache(cfg, 1))
            per_slot += sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(one))
    if not per_slot:
        return s.max_rows
    return max(1, min(s.max_slots, int(s.kv_cache_mb * 2**20) // per_slot))


class ModuleServer:
    """A running module server; `port` is bound, `ready` is set once SERVING."""

    def __init__(self, settings: ModuleServerSettings, add_ons: Sequence[AddOn] = ()):
        self.settings = settings
        self.add_ons = tuple(add_ons)
        telemetry.init(f"pathways-module-{settings.module}", prometheus=bool(settings.metrics_port))
        spec, _ = ckpt.load_spec(settings.checkpoint)
        for module in settings.modules:
            if module not in spec.modules:
                raise NotFound(
                    f"unknown module {module!r} in checkpoint "
                    f"{settings.checkpoint}; known: {', '.join(spec.modules)}"
                )
            if not ckpt.has_module(settings.checkpoint, module):
                raise NotFound(
                    f"checkpoint {settings.checkpoint} has no weights for module {module!r}"
                )
        self.cfgs = [spec.modules[m] for m in settings.modules]
        if len(self.cfgs) > 1:
            if self.add_ons:
                raise ValueError(
                    f"add-on services ({', '.join(a.name for a in self.add_ons)}) serve one "
                    f"module; module {settings.module!r} names {len(self.cfgs)}"
                )
            try:  # before any weights load: each module reads what the one before it writes
                chain.check_contracts(list(zip(settings.modules, self.cfgs)))
            except ValueError as e:
                raise ValueError(f"module {settings.module!r}: {e}") from None
        self.tls = settings.tls()
        transport.announce(self.tls, f"module server {settings.module!r}")
        # Streaming calls never take the last threads: health, reflection and unary calls
        # always find one (limits.StreamSlots).
        streaming = STREAMING_METHODS + tuple(m for a in self.add_ons for m in a.streaming_methods)
        self.streams = limits.StreamSlots(settings.workers, settings.stream_reserve(), streaming)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(settings.workers),
            options=transport.server_options(settings.max_message_mb),
            interceptors=[self.streams, *telemetry.server_interceptors()],
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE,
                *(a.name for a in self.add_ons),
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # Mutual TLS: only clients with a certificate of the deployment's CA get through.
        self.port = transport.add_port(self.server, f"{settings.host}:{settings.port}", self.tls)
        self.health_server = None
        if settings.health_port:
            self.health_server, _ = transport.health_server(
                self.health, settings.host, settings.health_port
            )
            self.health_server.start()  # NOT_SERVING until the weights are loaded and warm
        self.metrics_server = None
        if settings.metrics_port:
            from pathways import metrics

            self.metrics_server = metrics.serve(settings.host, settings.metrics_port)
        self.servicer: ModuleServicer | None = None
        self.stopped = threading.Event()

    def _set_health(self, status) -> None:
        for name in ("", SERVICE):
            self.health.set(name, status)

    def start(self) -> None:
        """Starts answering (health NOT_SERVING), loads weights, warms up, then SERVING."""
        s = self.settings
        mesh = sharding.make_mesh(sharding.parse_mesh(s.mesh)) if s.mesh else None
        slots = slot_count(self.cfgs, s)
        engines = []
        for module, cfg in zip(s.modules, self.cfgs):
            # No random weights first; bfloat16/int8 weights are converted as they are read,
            # so the float32 copy is never whole (on a mesh: only its placed copy is kept).
            e = ModuleEngine.from_checkpoint(module, cfg, s.checkpoint, slots, s.weights, mesh=mesh)
            # One copy of the weights while only serving, made before any step: each float32
            # array is dropped once its serving form exists, so the peak is about one copy, not
            # both (training through this server or its stateless Forward rebuild the float32
            # parameters, exactly for float32 weights, on first use).
            if e.rt.compact():
                cpu.release_free_memory()
            if mesh is not None:
                log.info(
                    "module %s: split over %s; %s",
                    module,
                    s.mesh,
                    "; ".join(e.rt.placement.notes) or "every array split",
                )
            engines.append(e)
        # Its module(s) stepped as one program (serving.chain), under one cap on compiled shapes
        # (sessions' steps, and each module's stateless Forward).
        engine = chain.ChainEngine(engines)
        engine.programs = limits.ProgramCap(s.max_programs)
        for e in engines:
            e.programs = engine.programs
        table = SessionTable(slots, s.session_ttl_s)
        self.budget = limits.MemoryBudget(s.memory_budget_mb)
        self.budget.check_start()  # the weights and the KV cache fit the budget
        self.servicer = ModuleServicer(
            engine, table, s.max_batch, s.batch_wait_ms / 1e3, s.max_call_tokens, self.budget
        )
        # The served weights change only through Publish, asked by the gateway (admin key).
        self.servicer.publishers = auth.PeerPolicy(s.publishers.split(","), "Publish")
        self.servicer.roots = s.roots()
        module_pb2_grpc.add_ModuleServiceServicer_to_server(self.servicer, self.server)
        # Add-ons share the port and the served modules' engines (training: the same weights).
        for a in self.add_ons:
            options = transport.grpc_options(s.max_message_mb)
            mount = Mount(tuple(engines), self.servicer, options, self.tls, s.roots(), s)
            a.add(self.server, mount)
        self.server.start()
        warm_up(self.servicer)
        # Again: an add-on that read the float32 parameters (training copies them) had them
        # rebuilt from the serving copy; one copy of the served weights again. Then what
        # warm-up's compilations left (Python cycles included) goes back to the OS too.
        for e in engines:
            e.rt.compact()
        gc.collect()
        cpu.release_free_memory()
        log.info(
            "module %s: %.0f MiB resident of its %s",
            s.module,
            limits.resident_bytes() / 2**20,
            self.budget.describe(),
        )
        self.servicer.count_request(reset=True)  # warm-up calls are not traffic
        self.servicer.ready = True
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        threading.Thread(target=self._reap, name="reaper", daemon=True).start()
        log.info("module %s (%s) serving on port %d", s.module, engine.kind.name, self.port)

    def _reap(self) -> None:
        while not self.stopped.wait(min(1.0, self.settings.session_ttl_s / 4)):
            self.servicer.table.expire()

    def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING first so balancers move away, then drain in-flight calls."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.health.enter_graceful_shutdown()
        if self.servicer is not None:
            self.servicer.ready = False
        self.server.stop(self.settings.grace_s if grace is None else grace).wait()
        if self.health_server is not None:
            self.health_server.stop(None)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.servicer is not None:
            self.servicer.batcher.stop()
        telemetry.shutdown()


class _Ctx:
    """A context for in-process warm-up calls (no deadline, no metadata)."""

    def time_remaining(self):
        return None

    def abort(self, code, details):
        raise RuntimeError(f"warm-up failed: {code.name}: {details}")

    def set_trailing_metadata(self, md):
        pass


def warm_up(svc: ModuleServicer) -> None:
    """Compiles prefill (8 positions; max_seq_len - 1 if fewer) and a one-row decode step
    through the real handlers, for modules that generation steps (tokens or hidden states in,
    hidden states or next-token logits out). Image and audio embeddings and pooling heads only
    run stateless Forward calls, whose shapes are the callers'; they compile on first use."""
    e, ctx = svc.engine, _Ctx()
    (reads, _), (writes, _) = e.cfg.input_contract, e.cfg.output_contract
    if reads not in ("tokens", "hidden") or writes not in ("hidden", "logits"):
        return
    svc.ready = True
    # 8 positions, fewer in a module with a shorter context (a policy's window of a few steps).
    n = min(8, e.max_seq_len - 1) if e.max_seq_len else 8
    try:
        sid = svc.OpenSession(module_pb2.OpenSessionRequest(batch_size=1), ctx).session_id
        if e.cfg.input_contract[0] == "tokens":
            x, step = np.zeros((1, n), np.int32), np.zeros((1, 1), np.int32)
        else:
            d = e.cfg.input_contract[1]
            x, step = np.zeros((1, n, d), np.float32), np.zeros((1, 1, d), np.float32)
        if n >= 1:
            svc.Prefill(
                module_pb2.PrefillRequest(
                    session_id=sid, input=codec.encode(x), starts=[0], lengths=[n], steps=[0]
                ),
                ctx,
            )
        svc.Decode(
            module_pb2.DecodeRequest(
                session_id=sid, input=codec.encode(step), positions=[max(n, 0)], steps=[1]
            ),
            ctx,
        )
        svc.CloseSession(module_pb2.CloseSessionRequest(session_id=sid), ctx)
    finally:
        svc.ready = False


def serve(settings: ModuleServerSettings, add_ons: Sequence[AddOn] = ()) -> None:
    """Runs until SIGTERM/SIGINT, then shuts down gracefully (always, via finally)."""
    threads = cpu.limit_threads(settings.cpu_threads)
    log.info("XLA computes with %d CPU thread(s)", threads)
    server = ModuleServer(settings, add_ons)
    done = signals.on_stop()
    try:
        server.start()
        print(f"module {settings.module} serving on {settings.host}:{server.port}", flush=True)
        signals.wait(done)
    finally:
        server.stop()
