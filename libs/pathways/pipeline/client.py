"""Pipeline stages that live in module servers: the client side of TrainingService."""

from __future__ import annotations

import queue
import secrets
import threading
import time

import grpc
import numpy as np

from pathways import codec, messages, transport
from pathways.executor.base import forward_input
from pathways.pipeline.runner import PipelineError, split_micro
from pathways.spec import PathwaySpec
from pathways.train import TrainConfig
from pathways.v1 import training_pb2, training_pb2_grpc


class RemoteStageError(RuntimeError):
    """A training call failed; the message names the module, its address and the server's reason."""


class RemoteStage:
    """The Stage interface over gRPC: the module trains inside its own service."""

    def __init__(
        self,
        name: str,
        kind: str,
        address: str,
        timeout: float = 600.0,
        max_message_mb: float = 256.0,
        tls: transport.TLSConfig | None = None,
    ):
        self.name, self.kind, self.address, self.timeout = name, kind, address, timeout
        self.wire_bytes = 0  # protobuf payload bytes sent and received, all calls
        # The attention mask its calls carry (None: Configure's); see set_causal.
        self.causal: bool | None = None
        self.lr_scale = 1.0  # factor of the next updates (ApplyRequest.lr_scale)
        self.optimizer = ""  # the named optimizer the next updates step (ApplyRequest.optimizer)
        self._stream = None  # (request queue, response iterator) of the current step
        self._channel = transport.channel(address, transport.grpc_options(max_message_mb), tls)
        self._stub = training_pb2_grpc.TrainingServiceStub(self._channel)

    def _call(self, method: str, request):
        try:
            response = getattr(self._stub, method)(request, timeout=self.timeout)
            self.wire_bytes += request.ByteSize() + response.ByteSize()
            return response
        except grpc.RpcError as e:
            raise RemoteStageError(
                f"module {self.name!r} at {self.address}: {method}: "
                f"{e.code().name}: {e.details()}"
            ) from None

    def configure(
        self,
        cfg: TrainConfig,
        frozen: bool = False,
        causal: bool = True,
        optimizers: dict[str, TrainConfig] | None = None,
    ) -> int:
        """Starts a training run on the server; `causal`: the pathway's attention mask;
        `optimizers`: named ones instead of `cfg`'s (see `LocalStage.set_optimizers`)."""
        opt = messages.optimizer_config(cfg)
        req = training_pb2.ConfigureRequest(
            module=self.name, optimizer=opt, frozen=frozen, bidirectional=not causal
        )
        for name, c in (optimizers or {}).items():
            req.optimizers.add(name=name, optimizer=messages.optimizer_config(c))
        r = self._call("Configure", req)
        self.causal = causal
        self.optimizer = next(iter(optimizers), "") if optimizers else ""
        if r.kind != self.kind:
            raise RemoteStageError(
                f"module {self.name!r} at {self.address} is {r.kind}, but "
                f"the spec says {self.kind}"
            )
        return r.parameters

    def use(self, key: str) -> None:
        """The named optimizer the next updates step (the server checks the name)."""
        self.optimizer = key

    def set_causal(self, causal: bool) -> None:
        """The attention mask of the pathway the next steps train (every call carries it, so
        pathways of different masks can train the module in turn); between steps only."""
        self.causal = causal

    def _mask(self, request):
        if self.causal is not None:
            request.bidirectional = not self.causal
        return request

    def _step_call(self, method: str, request):
        """One forward/backward over the step's stream (opened on first use, closed by apply)."""
        if self._stream is None:
            requests: queue.Queue = queue.Queue()
            responses = self._stub.Steps(iter(requests.get, None), timeout=self.timeout)
            self._stream = (requests, responses)
        requests, responses = self._stream
        wrapped = training_pb2.StepRequest(**{method.lower(): request})
        requests.put(wrapped)
        try:
            response = getattr(next(responses), method.lower())
        except grpc.RpcError as e:
            self._end_stream()
            raise RemoteStageError(
                f"module {self.name!r} at {self.address}: {method}: "
                f"{e.code().name}: {e.details()}"
            ) from None
        self.wire_bytes += wrapped.ByteSize() + response.ByteSize()
        return response

    def _end_stream(self) -> None:
        if self._stream is not None:
            self._stream[0].put(None)  # ends the request iterator: the server finishes the call
            self._stream[1].cancel()
            self._stream = None

    def forward(self, mb: int, x, targets=None):
        req = self._mask(training_pb2.TrainForwardRequest(micro_batch=mb))
        codec.encode(np.asarray(x), out=req.input)
        if targets is not None:
            codec.encode(forward_input(targets), out=req.targets)
        r = self._step_call("Forward", req)
        return np.float32(r.loss) if r.WhichOneof("result") == "loss" else codec.decode(r.output)

    def backward(self, mb: int, grad):
        req = training_pb2.TrainBackwardRequest(micro_batch=mb)
        codec.encode(np.asarray(grad, np.float32), out=req.grad)
        r = self._step_call("Backward", req)
        return codec.decode(r.grad_input) if r.HasField("grad_input") else None

    @staticmethod
    def direct_step(
        stages: list[RemoteStage],
        inputs: np.ndarray,
        targets: np.ndarray,
        n_micro: int,
        schedule: str = "1f1b",
        timeout: float | None = None,
    ) -> dict:
        """One training step with activations and gradients sent module to module.

        Starts TrainingService.RunStep on every stage at once; the first stage gets the inputs,
        the last the targets, and every activation and input gradient goes straight to the
        neighbouring stage's server (Deliver). Does not apply the gradients (see `apply`).
        On a failure every stage is reset (waiting stages abort) and PipelineError names the
        stage that failed first.

        Returns {"loss", "wall_seconds", "stage_seconds"} as `pipeline.runner.run_step` does.
        """
        xs, ts = split_micro(inputs, targets, n_micro)
        k = len(stages)
        step = secrets.randbits(63)
        calls = []
        t0 = time.perf_counter()
        for i, st in enumerate(stages):
            req = training_pb2.RunStepRequest(
                step=step,
                schedule=schedule,
                micro_batches=n_micro,
                stage=i,
                stages=k,
                next=stages[i + 1].address if i < k - 1 else "",
                previous=stages[i - 1].address if i > 0 else "",
            )
            st._mask(req)
            if i == 0:
                for x in xs:
                    codec.encode(np.asarray(x), out=req.inputs.add())
            if i == k - 1:
                for t in ts:
                    codec.encode(forward_input(t), out=req.targets.add())
            st.wire_bytes += req.ByteSize()
            calls.append(st._stub.RunStep.future(req, timeout=timeout or st.timeout))
        cv = threading.Condition()

        def wake(_):
            with cv:
                cv.notify_all()

        for call in calls:
            call.add_done_callback(wake)
        with cv:
            while not all(c.done() for c in calls):
                if any(c.done() and c.exception() is not None for c in calls):
                    break
                cv.wait(1.0)
        if any(c.done() and c.exception() is not None for c in calls):
            # Stages still waiting on the failed one abort when reset; then report the cause,
            # not the stages that aborted because of it.
            for st in stages:
                try:
                    st.reset()
                except RemoteStageError:
                    pass  # the dead one: its own error is reported below
            failures = []
            for st, call in zip(stages, calls):
                try:
                    call.result(timeout=30)
                except grpc.FutureTimeoutError:
                    call.cancel()
                except grpc.RpcError as e:
                    failures.append((st, e))
            st, e = next(
                ((s, e) for s, e in failures if e.code() != grpc.StatusCode.ABORTED), failures[0]
            )
            raise PipelineError(
                f"stage {st.name!r} at {st.address} failed in RunStep: "
                f"{e.code().name}: {e.details()}"
            )
        results = [c.result() for c in calls]
        for st, r in zip(stages, results):
            st.wire_bytes += r.ByteSize() + r.sent_bytes
        return {
            "loss": float(np.mean(results[-1].losses)),
            "wall_seconds": time.perf_counter() - t0,
            "stage_seconds": {st.name: r.busy_seconds for st, r in zip(stages, results)},
        }

    def apply(self) -> dict:
        self._end_stream()
        req = training_pb2.ApplyRequest(lr_scale=self.lr_scale, optimizer=self.optimizer)
        return {"grad_norm": self._call("Apply", req).grad_norm}

    def evaluate(self, x, targets=None):
        req = self._mask(training_pb2.EvaluateRequest())
        codec.encode(np.asarray(x), out=req.input)
        if targets is not None:
            codec.encode(forward_input(targets), out=req.targets)
        r = self._call("Evaluate", req)
        return np.float32(r.loss) if r.WhichOneof("result") == "loss" else codec.decode(r.output)

    def save(self, directory) -> None:
        self._call("Save", training_pb2.SaveRequest(directory=str(directory)))

    def load(self, directory) -> None:
        self._call("Load", training_pb2.LoadRequest(directory=str(directory)))

    def reset(self) -> None:
        self._end_stream()
        self._call("Reset", training_pb2.ResetRequest())

    def close(self) -> None:
        self._end_stream()
        self._channel.close()


def remote_stages(
    spec: PathwaySpec,
    pathway: str,
    addresses: dict[str, str],
    cfg: TrainConfig,
    frozen: set[str] = frozenset(),
    tls: transport.TLSConfig | None = None,
) -> list[RemoteStage]:
    """Configured stages for each module of `pathway`, at `addresses` (module -> host:port),
    over `tls` (default: this process's settings, `transport.default()`)."""
    chain = spec.pathway(pathway).modules
    missing = [m for m in chain if m not in addresses]
    if missing:
        raise ValueError(
            f"no module service address for {', '.join(missing)} of pathway " f"{pathway!r}"
        )
    stages = [RemoteStage(m, spec.modules[m].kind, addresses[m], tls=tls) for m in chain]
    causal = spec.pathway(pathway).causal  # each server trains with the pathway's mask
    try:
        for st in stages:
            st.configure(cfg, frozen=st.name in frozen, causal=causal)
    except Exception:
        for st in stages:
            st.close()
        raise
    return stages
