"""`pathways.v1.GatewayService`: tokenizes, drives generation over a RemoteExecutor, streams text."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pathways import catalog, chat, codec, infer, messages, names, telemetry, transport
from pathways import generate as gen
from pathways import metrics as prom
from pathways.executor.remote import RemoteExecutor
from pathways.executor.replicas import RemoteError, ReplicaSource
from pathways.modules.action import choose
from pathways.parallel import routing
from pathways.serving import auth, limits, signals
from pathways.serving.episodes import DEFAULT_TTL_S, Episodes
from pathways.serving.pathway_store import PathwayStore
from pathways.v1 import gateway_pb2, gateway_pb2_grpc, module_pb2

log = logging.getLogger(__name__)
SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


# Longest prompt accepted, in UTF-8 bytes, checked before tokenizing (a pathway's max_seq_len
# bounds its tokens after); the gateway's --max-prompt-bytes / PATHWAYS_MAX_PROMPT_BYTES.
MAX_PROMPT_BYTES = 256 * 1024


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self,
        executor: RemoteExecutor,
        tokenizer,
        addresses: auth.AddressPolicy,
        checkpoint: str | None = None,
        max_prompt_bytes: int = MAX_PROMPT_BYTES,
        session_ttl_s: float = DEFAULT_TTL_S,
        store: PathwayStore | None = None,
    ):
        self.executor, self.tokenizer = executor, tokenizer
        # Where AddModule / SetPathway / RemovePathway are recorded (None: in memory only); a
        # change and its record happen under one lock, so the file matches the table.
        self.store, self._table_lock = store, threading.Lock()
        self.episodes = Episodes(executor, ttl_s=session_ttl_s)  # pathways that act
        self.addresses = addresses  # what AddModule may dial
        self.max_prompt_bytes = max_prompt_bytes
        # The catalog's measurements and the chat template are read from the checkpoint.
        self.checkpoint = checkpoint
        template = chat.load(checkpoint)
        self.chat_template = template.to_json() if template is not None else ""
        # A DiPaCo checkpoint's router: a prompt for its family of paths goes to one path.
        self.router = routing.load(checkpoint, executor.spec)
        self.metrics = prom.GatewayMetrics()
        executor.on_hop = self.metrics.hop  # per-hop latency as the gateway sees it
        executor.on_move = self.metrics.move

    def ListPathways(self, request, context):
        spec, served = self.executor.spec, self.executor.served
        measured = catalog.read_measured(self.checkpoint)
        entries = []
        paths = [p for p in self.router.paths if p in served] if self.router is not None else []
        if paths:  # the family first: the name a request uses to be routed
            entries.append(catalog.family_entry(spec, self.router.family, paths, measured))
        for p in spec.pathways.values():
            if p.name in served:
                e = catalog.entry(spec, p.name, measured)
                if p.name in paths:
                    e["family"] = self.router.family
                entries.append(e)
        # A value left unset (None) was not measured.
        out = [
            gateway_pb2.PathwayInfo(**{k: v for k, v in e.items() if v is not None})
            for e in entries
        ]
        return gateway_pb2.ListPathwaysResponse(pathways=out, chat_template=self.chat_template)

    def AddModule(self, request, context):
        from pathways.modules import config_from_dict
        from pathways.v1 import module_pb2_grpc

        if not request.name or not request.addresses:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name and addresses are required")
        try:
            names.check(request.name, "name")  # before dialing anything
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        for i, address in enumerate(request.addresses):
            refused = self.addresses.check(address)
            if refused:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"addresses[{i}]: {refused}")
        try:
            with transport.channel(request.addresses[0], tls=self.executor.tls) as ch:
                d = module_pb2_grpc.ModuleServiceStub(ch).Describe(
                    module_pb2.DescribeRequest(), timeout=10
                )
        except grpc.RpcError as e:
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"module {request.name!r} at "
                f"{request.addresses[0]}: {e.code().name}: {e.details()}",
            )
        if d.name != request.name:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the service at "
                f"{request.addresses[0]} hosts module {d.name!r}, not {request.name!r}",
            )
        try:
            config = json.loads(d.config_json)
            cfg = config_from_dict({"kind": d.kind, **config}, where=f"module {d.name!r}")
            with self._table_lock:
                self.executor.add_module(request.name, cfg, list(request.addresses))
                if self.store is not None:
                    self.store.added_module(request.name, d.kind, config, list(request.addresses))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return gateway_pb2.AddModuleResponse(kind=d.kind)

    def SetPathway(self, request, context):
        unknown = [m for m in request.modules if m not in self.executor.spec.modules]
        if unknown:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"pathway {request.name!r}: unknown "
                f"module(s) {', '.join(unknown)} (register with AddModule)",
            )
        try:
            with self._table_lock:
                self.executor.set_pathway(request.name, list(request.modules))
                if self.store is not None:
                    self.store.set_pathway(request.name, list(request.modules))
        except ValueError as e:  # SpecError included: the message names modules and values
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        p = self.executor.spec.pathway(request.name)
        return gateway_pb2.SetPathwayResponse(
            pathway=gateway_pb2.PathwayInfo(
                name=p.name, modules=p.modules, max_seq_len=p.max_seq_len
            )
        )

    def Publish(self, request, context):
        """Admin: every replica of the named modules (none: all) serves new weights, from a
        checkpoint or from its training copy (ModuleService.Publish, asked with the gateway's
        certificate: the only one module servers take it from)."""
        from pathways.v1 import module_pb2_grpc

        modules = list(request.modules) or list(self.executor.replicas)
        for i, m in enumerate(modules):
            try:
                names.check(m, f"modules[{i}]")
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        unknown = [m for m in modules if m not in self.executor.replicas]
        if unknown:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no replicas of module(s) {', '.join(unknown)} at this gateway",
            )
        if request.from_training == bool(request.checkpoint):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "give exactly one of checkpoint and from_training"
            )
        req = module_pb2.PublishRequest(
            checkpoint=request.checkpoint, from_training=request.from_training
        )
        published = []
        for m in modules:
            for address in self.executor.replicas[m].source.replicas(m):
                try:
                    with transport.channel(address, tls=self.executor.tls) as ch:
                        module_pb2_grpc.ModuleServiceStub(ch).Publish(req, timeout=300)
                except grpc.RpcError as e:
                    done = ", ".join(published) or "none"
                    context.abort(
                        e.code(),
                        f"module {m!r} at {address}: {e.code().name}: {e.details()} "
                        f"(published before: {done})",
                    )
                published.append(f"{m}@{address}")
        log.info("published %s from %s", ", ".join(published), request.checkpoint or "training")
        return gateway_pb2.PublishModulesResponse(published=published)

    def RemovePathway(self, request, context):
        if request.name not in self.executor.spec.pathways:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown pathway {request.name!r}")
        try:
            with self._table_lock:
                self.executor.remove_pathway(request.name)
                if self.store is not None:
                    self.store.removed_pathway(request.name)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return gateway_pb2.RemovePathwayResponse()

    def Generate(self, request, context):
        spec = self.executor.spec
        name = request.pathway or spec.default_pathway
        # Routed: no pathway named, or the family of a DiPaCo checkpoint's paths (not itself a
        # pathway of its spec); the path is chosen once the prompt's size is checked.
        routed = self.router is not None and request.pathway in ("", self.router.family)
        if routed:
            name = self.router.family
        record = self.metrics.generation(name if routed or name in self.executor.served else "")
        try:
            yield from self._generate(request, context, name, record, routed)
        finally:
            record.finish()

    def _generate(self, request, context, name, record, routed=False):
        spec = self.executor.spec
        if routed:
            name = self._route(request.prompt, context, record)
        if name not in self.executor.served:
            record.status = "NOT_FOUND"
            known = ", ".join(p for p in spec.pathways if p in self.executor.served)
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown pathway {name!r}; this gateway serves: {known}"
            )
        why = infer.generation_error(spec, name)
        if why:  # an image or audio pathway has no next-token head to sample from
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, why)
        try:
            params = messages.sampling_from_options(request.sampling)
        except ValueError as e:
            record.status = "INVALID_ARGUMENT"
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {e}")
        if not routed:  # a routed prompt's size was checked before routing
            self._check_prompt_size(request.prompt, context, record)
        # As generate.stream counts it (an empty prompt starts from end-of-text).
        prompt_tokens = max(1, len(self.tokenizer.encode(request.prompt)))
        events = gen.stream(self.executor, name, [request.prompt], self.tokenizer, params)
        try:
            with self.executor.deadline(context.time_remaining()):
                for ev in events:
                    if ev.token_id >= 0:
                        record.token()
                    yield gateway_pb2.GenerateResponse(
                        token_id=ev.token_id,
                        text=ev.text,
                        finish_reason=ev.finished or "",
                        prompt_tokens=prompt_tokens if ev.finished else 0,
                        pathway=name,
                        routed=routed,
                    )
            record.status = "OK"
        except RemoteError as e:
            record.status = e.code.name
            _abort_remote(context, e)
        except ValueError as e:
            record.status = "INVALID_ARGUMENT"
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            events.close()  # closes the session on every module, also on cancel

    def _check_prompt_size(self, prompt: str, context, record, field: str = "prompt") -> None:
        size = len(prompt.encode("utf-8", "surrogatepass"))
        if size > self.max_prompt_bytes:
            if record is not None:
                record.status = "INVALID_ARGUMENT"
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{field} has {size} bytes, over the gateway's max_prompt_bytes = "
                f"{self.max_prompt_bytes} (--max-prompt-bytes)",
            )

    def _route(self, prompt: str, context, record=None, field: str = "prompt") -> str:
        """The path of the DiPaCo router for `prompt` (its first tokens through the router's
        frozen pathway, in this process; only the path's modules then run on the servers)."""
        self._check_prompt_size(prompt, context, record, field)
        try:
            return self.router.path_of(self.tokenizer, prompt)
        except ValueError as e:
            if record is not None:
                record.status = "INVALID_ARGUMENT"
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"routing the {field}: {e}")

    def Infer(self, request, context):
        field = request.WhichOneof("input")
        if field is None and request.end_session and request.session_id:
            self.episodes.end(request.session_id)
            return gateway_pb2.InferResponse(session_id=request.session_id)
        if field is None:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "input: one of tensor, image, wav, text is needed"
            )
        if request.session_id or request.start_session:
            return self._episode_step(request, context, field)
        outputs = {
            gateway_pb2.InferRequest.OUTPUT_HEAD: "head",
            gateway_pb2.InferRequest.OUTPUT_EMBEDDING: "embedding",
        }
        if request.output not in outputs:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"output: unknown value {request.output}"
            )
        pathway, routed = request.pathway, False
        if self.router is not None and pathway in ("", self.router.family):
            if field == "text" and request.text:  # routed as Generate routes a prompt
                pathway, routed = self._route(request.text, context, field="text"), True
            elif pathway:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"pathway: {pathway!r} is a routed family of paths "
                    f"({', '.join(self.router.paths)}) and only a text input is routed; "
                    f"name one of its paths for {field} input",
                )
        with _infer_statuses(context):
            value = getattr(request, field)
            if field == "tensor":
                value = codec.decode(value, "tensor")
            name, x = infer.prepare(
                self.executor.spec,
                self.executor.served,
                pathway,
                field,
                value,
                self.tokenizer,
            )
            with self.executor.deadline(context.time_remaining()):
                res = infer.run(self.executor, name, x, outputs[request.output], request.top_k)
        out = _infer_response(res)
        out.routed = routed
        return out

    def _episode_step(self, request, context, field):
        """One observation of an episode in, one action out (`serving.episodes`)."""
        if request.session_id and request.start_session:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "give session_id (a running episode) or start_session (a new one), not both",
            )
        if field != "tensor":
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{field}: an episode's step takes its observation as a tensor",
            )
        if request.output != gateway_pb2.InferRequest.OUTPUT_HEAD:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "output: an episode's step returns its action"
            )
        spec, key, done = self.executor.spec, request.session_id, False
        try:
            with _infer_statuses(context):
                obs = codec.decode(request.tensor, "tensor")
                if request.start_session:
                    obs_dim = obs.shape[-1] if obs.ndim else 0
                    name = infer.acting_pathway(
                        spec, self.executor.served, request.pathway, obs_dim
                    )
                    infer.check_observation(obs, spec, name)  # before a session is opened
                    try:
                        key = self.episodes.start(name)
                    except ValueError as e:  # not a pathway from observations to actions
                        raise infer.WrongPathway(str(e)) from None
                else:
                    name = self.episodes.pathway(key)
                    if request.pathway and request.pathway != name:
                        raise infer.InferError(
                            f"pathway: episode {key!r} runs on pathway {name!r}, not "
                            f"{request.pathway!r}"
                        )
                x = infer.check_observation(obs, spec, name)
                with self.executor.deadline(context.time_remaining()):
                    out, discrete, step = self.episodes.step(key, x)
                done = True
        finally:
            # An episode whose first step failed is ended: its id never reached the caller.
            if key and (request.end_session or (request.start_session and not done)):
                self.episodes.end(key)
        res = infer.Result(
            name,
            "actions",
            actions=[choose(out, discrete)],
            discrete=discrete,
            values=out[None],
            step=step,
            session_id=key,
        )
        return _infer_response(res)


def _abort_remote(context, e: RemoteError):
    """Ends the call with a module server's status (CANCELLED as UNAVAILABLE), passing on its
    retry hint (a full KV-cache pool: trailing `retry-after-ms`, which the HTTP front turns into
    Retry-After)."""
    if e.retry_after_s is not None:
        transport.set_retry_after(context, e.retry_after_s)
    # A module call cancelled by its server (shutting down, after the session's moves ran out)
    # is not the caller's cancellation: to the caller the service is unavailable.
    code = grpc.StatusCode.UNAVAILABLE if e.code == grpc.StatusCode.CANCELLED else e.code
    context.abort(code, str(e))


@contextlib.contextmanager
def _infer_statuses(context):
    """An Infer call's errors as its gRPC status: the servers' (RemoteError), the request's
    (InferError: INVALID_ARGUMENT, NOT_FOUND, ...), a tensor's encoding (INVALID_ARGUMENT)."""
    try:
        yield
    except RemoteError as e:
        _abort_remote(context, e)
    except infer.InferError as e:
        context.abort(grpc.StatusCode[e.status], str(e))
    except ValueError as e:  # the tensor's encoding (codec)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


def _infer_response(res: infer.Result) -> gateway_pb2.InferResponse:
    out = gateway_pb2.InferResponse(
        pathway=res.pathway, session_id=res.session_id, prompt_tokens=res.prompt_tokens
    )
    if res.kind == "actions":
        for a, values in zip(res.actions, res.values):
            out.actions.items.add(
                choice=a if res.discrete else 0,
                values=values.tolist() if res.discrete else a.tolist(),
                discrete=res.discrete,
                step=res.step,
            )
    elif res.kind == "classification":
        for classes, probs in zip(res.classes, res.probabilities):
            out.classification.items.add(classes=classes, probabilities=probs)
    elif res.kind == "transcript":
        out.transcript.texts.extend(res.texts)
    else:
        codec.encode(res.embedding, "float32", out=out.embedding)
    return out


class GatewayServer:
    def __init__(
        self,
        spec,
        tokenizer,
        endpoints: dict[str, list[str]] | ReplicaSource,  # see RemoteExecutor
        port: int = 0,
        host: str = "127.0.0.1",
        wire_dtype: str = "float32",
        workers: int = 128,  # generations in flight: all but max(2, workers // 8)
        max_message_mb: float = 64.0,
        lockstep_wait_s: float = 0.02,
        tls: transport.TLSConfig | None = None,
        keys: auth.KeyStore | None = None,
        allowed_addresses: list[str] | None = None,
        health_port: int = 0,
        checkpoint: str | None = None,
        metrics_port: int = 0,
        max_prompt_bytes: int = MAX_PROMPT_BYTES,
        session_ttl_s: float = DEFAULT_TTL_S,
        pathways_file: str | None = None,
        colocated: Sequence[Sequence[str]] = (),
        grace_s: float = 5.0,
    ):
        """`keys`: the API keys callers must present (None: no keys, every caller is admin;
        logged). `allowed_addresses`: "host:port" patterns AddModule may dial (None: the
        static `endpoints`' own addresses). `health_port`: a plaintext port answering only
        grpc.health.v1 (Kubernetes' probes; 0: none). `checkpoint`: where the pathway catalog's
        measurements and the chat template are read. `metrics_port`: a plaintext port serving
        GET /metrics (Prometheus; 0: none). `session_ttl_s`: an episode of a pathway that acts
        (Infer with a session) is closed after this long without a step. `pathways_file`: where
        the pathway table's changes are kept across restarts (`serving.pathway_store`; applied
        here before serving, StoreError naming the entry when it cannot be; None: they last as
        long as this process). `colocated`: groups of modules one server hosts, with a
        ReplicaSource (see RemoteExecutor). `grace_s`: how long `stop` lets calls in flight
        (whole generations) finish."""
        if not grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0; got {grace_s!r}")
        self.grace_s = grace_s
        telemetry.init("pathways-gateway", prometheus=bool(metrics_port))
        self.metrics_host, self.metrics_port, self.metrics_server = host, metrics_port, None
        self.tls = transport.default() if tls is None else tls
        transport.announce(self.tls, "gateway")
        self.executor = RemoteExecutor(
            spec,
            endpoints,
            wire_dtype=wire_dtype,
            max_message_mb=max_message_mb,
            lockstep_wait_s=lockstep_wait_s,
            tls=self.tls,  # its certificate is its client certificate at the module servers
            colocated=colocated,
        )
        store = None
        if pathways_file:
            if not checkpoint:
                raise ValueError("a pathways file needs the gateway's checkpoint")
            store = PathwayStore(pathways_file, checkpoint, self.executor.spec.pathways)
            store.apply(self.executor)
        else:
            log.info("no pathways file: pathway table changes last until the gateway stops")
        if keys is None:
            log.warning("gateway without API keys: every caller may change its pathways")
        if allowed_addresses is None:
            own = endpoints if isinstance(endpoints, dict) else {}
            allowed_addresses = [a for addrs in own.values() for a in addrs]
        interceptors = [auth.KeyInterceptor(keys)] if keys is not None else []
        # Generations hold a handler thread each; a few always stay for health and short calls.
        self.streams = limits.StreamSlots(workers, max(2, workers // 8), [f"/{SERVICE}/Generate"])
        interceptors.insert(0, self.streams)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(workers),
            options=transport.server_options(max_message_mb),
            interceptors=[*interceptors, *telemetry.server_interceptors()],
        )
        self.servicer = GatewayServicer(
            self.executor,
            tokenizer,
            auth.AddressPolicy(allowed_addresses),
            checkpoint,
            max_prompt_bytes,
            session_ttl_s,
            store,
        )
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        # TLS without client certificates: users authenticate with API keys (see auth.py).
        self.port = transport.add_port(self.server, f"{host}:{port}", self.tls, False)
        self.health_server = (
            transport.health_server(self.health, host, health_port)[0] if health_port else None
        )

    def start(self) -> None:
        if self.metrics_port:
            self.metrics_server = prom.serve(self.metrics_host, self.metrics_port)
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, new calls refused; calls in flight get `grace` seconds (default: the
        server's grace_s) to finish; returns when none is left."""
        self.health.enter_graceful_shutdown()
        self.server.stop(self.grace_s if grace is None else grace).wait()
        if self.health_server is not None:
            self.health_server.stop(None)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.servicer.episodes.close()
        self.executor.close()
        telemetry.shutdown()

    def serve_forever(self) -> None:
        done = signals.on_stop()
        try:
            self.start()
            print(f"gateway serving on 127.0.0.1:{self.port}", flush=True)
            signals.wait(done)
        finally:
            self.stop()
