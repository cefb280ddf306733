"""TrainingService: a module server trains its own module (pipeline stage behind gRPC)."""

from __future__ import annotations

import logging
import math
import threading

import grpc
import jax
import jax.numpy as jnp
import numpy as np

from pathways import codec, messages, names, paths, transport
from pathways.pipeline import peer
from pathways.pipeline.stage import LocalStage
from pathways.serving import auth
from pathways.serving.engine import ModuleEngine
from pathways.serving.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from pathways.serving.limits import LimitExceeded, positions_field
from pathways.serving.server import AddOn, Mount
from pathways.train import make_optimizer
from pathways.transport import rpc
from pathways.v1 import training_pb2, training_pb2_grpc

log = logging.getLogger(__name__)


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """Wraps the served module's runtime in a LocalStage: the same code as local training."""

    def __init__(
        self,
        engine: ModuleEngine,
        serving,
        peer_options=(),
        tls=None,
        roots: paths.Roots = None,
        settings=None,
    ):
        """`engine`: the served module's; training runs on a copy of its weights of its own (an
        engine without a cache), so served weights change only through ModuleService.Publish.
        `settings`: the module server's (`ModuleServerSettings`), whose limits bound the calls
        here and whose `training_peers` may call (None: unbounded, anyone; in-process use)."""
        self.serving_engine = engine
        self.engine = _training_copy(engine)
        self.peers_policy = (
            auth.PeerPolicy(settings.training_peers.split(","), "TrainingService")
            if settings
            else None
        )
        # Where Save/Load may read and write (None: anywhere; in-process use only).
        self.roots = roots
        self.settings = settings
        self.max_micro_batches = settings.max_micro_batches if settings else None
        # RunStep deliveries from the neighbouring stages (bounded on a server).
        self.inbox = (
            peer.Inbox(int(settings.max_inbox_mb * 2**20), 4 * settings.max_micro_batches)
            if settings
            else peer.Inbox()
        )
        self.peers = peer.Peers(list(peer_options), tls)  # the server's own certificate
        # Latency metrics and the request counter are the module server's, shared with serving.
        self.metrics, self.count_request = serving.metrics, serving.count_request
        self.stage: LocalStage | None = None
        self.applied = 0  # optimizer steps applied since the server started (logged)
        # Calls for one module arrive in schedule order from one client thread; the lock keeps
        # a stray concurrent caller from interleaving with them.
        self._lock = threading.Lock()

    def _check_peer(self, context) -> None:
        why = self.peers_policy.refusal(context) if self.peers_policy is not None else None
        if why:
            raise PermissionDenied(why)

    def _stage(self) -> LocalStage:
        if self.stage is None:
            raise FailedPrecondition(
                f"module {self.engine.name!r} has no training run: call " f"Configure first"
            )
        return self.stage

    def _decode(self, t, field: str) -> np.ndarray:
        """A tensor of this module's inputs or gradients, refused before decoding when it holds
        more than max_call_tokens positions of the module's widest side."""
        if self.settings is not None:
            cfg = self.engine.cfg
            width = max(
                1, *(d for k, d in (cfg.input_contract, cfg.output_contract) if k != "tokens")
            )
            n = math.prod(max(0, d) for d in t.shape)
            limit = self.settings.max_call_tokens
            if n > limit * width:
                raise LimitExceeded(
                    f"{field} has {n} elements, over max_call_tokens = {limit} positions of "
                    f"{width} (--max-call-tokens / PATHWAYS_MAX_CALL_TOKENS)"
                )
        return codec.decode(t, field)

    def _mask(self, request) -> LocalStage:
        """The stage, with the request's attention mask where it sets one (issue 19: pathways
        of different masks train this module in turn)."""
        st = self._stage()
        if request.HasField("bidirectional"):
            try:
                st.set_causal(not request.bidirectional)
            except ValueError as e:
                raise FailedPrecondition(str(e)) from None
        return st

    def _input(self, t, field: str, rows: int | None = None) -> np.ndarray:
        x = self._decode(t, field)
        self.engine.check_input(x, field, rows)
        self._admit(x, field)
        return x

    def _admit(self, x: np.ndarray, field: str) -> None:
        """Training inputs within max_call_tokens, and their shape within the program cap."""
        if self.settings is None:
            return
        rows, length = x.shape[:2]
        positions, field = positions_field(self.engine.cfg, field, length)
        limit = self.settings.max_call_tokens
        if rows * positions > limit:
            raise LimitExceeded(
                f"{field} has {rows} rows x {positions} positions, over max_call_tokens = "
                f"{limit} (--max-call-tokens / PATHWAYS_MAX_CALL_TOKENS)"
            )
        self.engine.programs.admit(("training step", x.shape, x.dtype.str))

    def _targets(self, request) -> np.ndarray | None:
        kind = self.engine.kind
        if not kind.is_head:
            if request.HasField("targets"):
                raise InvalidArgument(
                    f"targets are only for the head module; " f"{self.engine.name!r} is {kind.name}"
                )
            return None
        if not request.HasField("targets"):
            raise InvalidArgument(
                f"targets are required by {kind.name} module {self.engine.name!r}"
            )
        t = self._decode(request.targets, "targets")
        outputs, vocab = self.engine.cfg.output_contract
        if outputs == "actions":
            return self._action_targets(t, tuple(request.input.shape)[:2])
        # What the head's loss reads: next tokens (B, T) for logits; labels (B,) for classes,
        # label sequences (B, L) for a CTC head: one row per input either way.
        x_shape = tuple(request.input.shape)[:2] if outputs == "logits" else None
        rows = int(request.input.shape[0]) if request.input.shape else -1
        if t.dtype != np.int32 or (t.shape != x_shape if x_shape else t.shape[:1] != (rows,)):
            want = list(x_shape) if x_shape else f"({rows}, ...)"
            raise InvalidArgument(
                f"targets must be int32 of shape {want}; got {t.dtype} {list(t.shape)}"
            )
        if ((t < 0) | (t >= vocab)).any():
            raise InvalidArgument(f"targets has an id outside [0, {vocab}) ({outputs})")
        return t

    def _action_targets(self, t: np.ndarray, x_shape: tuple) -> np.ndarray:
        """An action head's targets, one per step: chosen actions (B, T) int32 (-1: padding)
        for a discrete head, action values (B, T, A) float32 (NaN rows: padding) for a
        continuous one."""
        cfg = self.engine.cfg
        if cfg.space == "discrete":
            if t.dtype != np.int32 or t.shape != x_shape:
                raise InvalidArgument(
                    f"targets must be int32 actions of shape {list(x_shape)}; got {t.dtype} "
                    f"{list(t.shape)}"
                )
            if ((t < -1) | (t >= cfg.actions)).any():
                raise InvalidArgument(
                    f"targets has an action outside [0, {cfg.actions}) (-1: padding)"
                )
            return t
        want = (*x_shape, cfg.actions)
        if t.dtype != np.float32 or t.shape != want:
            raise InvalidArgument(
                f"targets must be float32 action values of shape {list(want)}; got {t.dtype} "
                f"{list(t.shape)}"
            )
        if np.isinf(t).any():
            raise InvalidArgument("targets has infinite values (NaN marks padding steps)")
        return t

    @rpc
    def Configure(self, request, context):
        self._check_peer(context)
        if request.module != self.engine.name:
            raise NotFound(
                f"this server hosts module {self.engine.name!r}, not " f"{request.module!r}"
            )
        try:
            cfg = messages.train_config(request.optimizer)
        except ValueError as e:
            raise InvalidArgument(f"optimizer.{e}") from None
        named = {}
        for i, o in enumerate(request.optimizers):
            try:
                names.check(o.name, f"optimizers[{i}].name")
                if o.name in named:
                    raise ValueError(f"optimizers[{i}].name {o.name!r} is given twice")
                named[o.name] = make_optimizer(messages.train_config(o.optimizer))
            except ValueError as e:
                msg = str(e)
                raise InvalidArgument(
                    msg if msg.startswith("optimizers[") else f"optimizers[{i}].optimizer.{msg}"
                ) from None
        self.inbox.abort()  # a step left waiting by a driver that died must not block a new run
        with self._lock:
            self.stage = LocalStage(
                self.engine.rt,
                named or make_optimizer(cfg),
                frozen=request.frozen,
                causal=not request.bidirectional,
            )
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.engine.rt.state))
        return training_pb2.ConfigureResponse(kind=self.engine.kind.name, parameters=n)

    @rpc
    def Forward(self, request, context):
        self._check_peer(context)
        with self._lock:
            st = self._stage()
            if request.micro_batch in st.pending:
                raise FailedPrecondition(
                    f"micro_batch {request.micro_batch} already has a forward pending on module "
                    f"{self.engine.name!r} (its backward, or Reset, first)"
                )
            st = self._mask(request)
            x = self._input(request.input, "input")
            y = st.forward(request.micro_batch, x, self._targets(request))
            if self.engine.kind.is_head:
                return training_pb2.TrainForwardResponse(loss=float(y))
            return training_pb2.TrainForwardResponse(output=codec.encode(np.asarray(y)))

    @rpc
    def Backward(self, request, context):
        self._check_peer(context)
        with self._lock:
            st = self._stage()
            if request.micro_batch not in st.pending:
                raise NotFound(
                    f"micro_batch {request.micro_batch} has no forward pending on "
                    f"module {self.engine.name!r}"
                )
            g = self._decode(request.grad, "grad")
            if g.dtype != np.float32:
                raise InvalidArgument(f"grad must be float32; got {g.dtype}")
            try:
                g_x = st.backward(request.micro_batch, g)
            except (TypeError, ValueError) as e:  # a gradient of the wrong shape
                raise InvalidArgument(f"grad: {e}") from None
            resp = training_pb2.TrainBackwardResponse()
            if g_x is not None:
                codec.encode(np.asarray(g_x), out=resp.grad_input)
            return resp

    def Steps(self, request_iterator, context):
        why = self.peers_policy.refusal(context) if self.peers_policy is not None else None
        if why:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        for req in request_iterator:
            if req.WhichOneof("op") == "forward":
                yield training_pb2.StepResponse(forward=self.Forward(req.forward, context))
            else:
                yield training_pb2.StepResponse(backward=self.Backward(req.backward, context))

    @rpc
    def RunStep(self, request, context):
        self._check_peer(context)

        def check_input(x, m):
            self.engine.check_input(x, f"input of micro-batch {m}", None)
            self._admit(x, f"input of micro-batch {m}")
            return x

        def check_targets(t, m):
            req = training_pb2.TrainForwardRequest(targets=t)
            req.input.shape.extend(list(t.shape)[:2])
            return self._targets(req)

        with self._lock:
            return peer.run_step(
                request,
                self._mask(request),
                self.inbox,
                self.peers,
                check_input,
                check_targets,
                transport.deadline(context),
                context.is_active,
                self.max_micro_batches,
            )

    @rpc
    def Deliver(self, request_iterator, context):
        self._check_peer(context)
        return peer.deliver(request_iterator, self.inbox, self._decode)

    @rpc
    def Apply(self, request, context):
        self._check_peer(context)
        with self._lock:
            st = self._stage()
            if st.pending:
                raise FailedPrecondition(
                    f"micro-batches {st.pending} still await "
                    f"their backward on module {self.engine.name!r}"
                )
            scale = request.lr_scale if request.HasField("lr_scale") else 1.0
            if not scale > 0:  # NaN too
                raise InvalidArgument(f"lr_scale must be > 0; got {scale}")
            if request.optimizer:
                try:
                    st.use(request.optimizer)
                except ValueError as e:
                    raise InvalidArgument(f"optimizer: {e}") from None
            st.lr_scale = scale
            grad_norm = st.apply()["grad_norm"]
            self.applied += 1
        # One line per training step in the server's log: how an operator (and the demo test)
        # sees that training went through this server.
        log.info(
            "module %s: optimizer step applied (%d since start; grad norm %.4g)",
            self.engine.name,
            self.applied,
            grad_norm,
        )
        return training_pb2.ApplyResponse(grad_norm=grad_norm)

    @rpc
    def Evaluate(self, request, context):
        self._check_peer(context)
        with self._lock:
            st = self._mask(request)
        x = self._input(request.input, "input")
        y = st.evaluate(x, self._targets(request))
        if self.engine.kind.is_head:
            return training_pb2.EvaluateResponse(loss=float(y))
        return training_pb2.EvaluateResponse(output=codec.encode(np.asarray(y)))

    def _directory(self, directory: str) -> str:
        if not directory:
            raise InvalidArgument("directory is required")
        if self.roots is None:
            return directory
        try:
            return str(self.roots.check(directory, "directory"))
        except paths.PathError as e:
            raise PermissionDenied(str(e)) from None

    @rpc
    def Save(self, request, context):
        self._check_peer(context)
        directory = self._directory(request.directory)
        with self._lock:
            self._stage().save(directory)
        return training_pb2.SaveResponse()

    @rpc
    def Load(self, request, context):
        self._check_peer(context)
        directory = self._directory(request.directory)
        self.inbox.abort()  # as Configure: resuming never waits on a dead driver's step
        with self._lock:
            st = self._stage()
            try:
                st.load(directory)
            except FileNotFoundError as e:
                raise NotFound(f"directory {request.directory!r}: {e}") from None
        return training_pb2.LoadResponse()

    @rpc
    def Reset(self, request, context):
        self._check_peer(context)
        self.inbox.abort()  # first: a RunStep waiting on a neighbour holds the lock
        with self._lock:
            if self.stage is not None:
                self.stage.reset()
        return training_pb2.ResetResponse()


SERVICE = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name


def _training_copy(engine: ModuleEngine) -> ModuleEngine:
    """An engine (no cache) over a copy of `engine`'s weights, for training: its updates donate
    their buffers, which must not be the served ones."""
    copy = jax.tree.map(lambda a: jnp.array(a, copy=True), engine.rt.state)
    train = ModuleEngine(engine.name, engine.cfg, copy)
    train.programs = engine.programs  # one cap on compiled shapes per server
    return train


def _mount(server, m: Mount) -> None:
    if len(m.engines) != 1:  # the server's settings refuse it first (--training)
        raise ValueError("training serves one module per server")
    servicer = TrainingServicer(
        m.engines[0], m.servicer, m.channel_options, m.tls, m.roots, m.settings
    )
    # ModuleService.Publish(from_training) serves what this copy has learnt.
    m.servicer.training_state = lambda: servicer.engine.rt.state
    training_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server)


# A module server started with --training mounts TrainingService (same port, its own copy of the
# weights): services/module_server.
ADD_ON = AddOn(
    SERVICE,
    _mount,
    # Steps streams; RunStep and Deliver wait on the other stages' servers.
    streaming_methods=tuple(f"/{SERVICE}/{m}" for m in ("Steps", "RunStep", "Deliver")),
)
__all__ = ["ADD_ON", "SERVICE", "TrainingServicer"]
