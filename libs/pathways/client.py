"""Python clients for the gateway's gRPC API: `Client` (blocking) and `AsyncClient` (asyncio).

    from pathways.client import Client

    with Client() as c:                      # the running `pathways up`, its certificate and key
        for tok in c.generate("def ", max_tokens=40):
            print(tok.text, end="", flush=True)
        print(c.complete("def ", max_tokens=40).text)
        print([p.name for p in c.pathways()])

Where the gateway is and how to reach it (`target`): an explicit address uses
PATHWAYS_TLS_DIR / PATHWAYS_INSECURE and PATHWAYS_API_KEY from the environment (plaintext when
neither TLS setting is set), unless it is the local deployment's, whose state file says where
the local user's certificate and key are; no address means the local deployment's. Failed calls
raise `GatewayError` with the gRPC status, its message and, when the servers are full, how long
to wait; a Generate or ListPathways call that a gateway going away refused before answering is
retried first (`RETRY_POLICY`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc

from pathways import chat, messages, telemetry, transport
from pathways.serving import auth
from pathways.v1 import gateway_pb2, gateway_pb2_grpc

DEFAULT_TIMEOUT_S = 300.0
_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
# gRPC retries a call the gateway refused before any response came back, with backoff: during a
# rollout or scale-down a call can reach a gateway whose shutdown has begun (it is cancelled
# there: CANCELLED) or find no connection for a moment (UNAVAILABLE); the retry goes to another
# gateway. Only calls with no effect before their first message: Generate and ListPathways
# (Infer is not retried: an episode's step changes the episode). Throttled, so a gateway that is
# down for good does not get a storm of retries.
RETRY_POLICY = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": _SERVICE, "method": m} for m in ("Generate", "ListPathways")],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
)


def with_retries(options: Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    """`options` plus RETRY_POLICY, unless they bring a service config of their own."""
    options = list(options)
    if not any(k == "grpc.service_config" for k, _ in options):
        options.append(("grpc.service_config", RETRY_POLICY))
    return options


@dataclasses.dataclass(frozen=True)
class Target:
    """A gateway's address, the TLS settings to reach it and the API key to present."""

    address: str
    tls: transport.TLSConfig
    api_key: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return auth.client_metadata(self.api_key)


def _read_key(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"API key file {path}: {e.strerror or e}") from None


def target(
    address: str | None = None,
    api_key: str | None = None,
    tls: transport.TLSConfig | None = None,
) -> Target:
    """Resolves how to reach a gateway (see the module docstring); `api_key` and `tls`, when
    given, replace what would be found. ValueError when there is no address to use."""
    from pathways.deploy import local

    info = local.read()
    if not address and not (info and info.get("gateway")):
        raise ValueError(
            "no gateway found: start one with `pathways up`, or pass --gateway HOST:PORT"
        )
    if info and info.get("gateway") and address in (None, "", info["gateway"]):
        if tls is None:
            if info.get("tls"):
                tls = transport.TLSConfig.from_dir(info["tls"])
            else:
                tls = transport.TLSConfig.plaintext()
        if api_key is None and info.get("api_key_file"):
            api_key = _read_key(info["api_key_file"])
        return Target(info["gateway"], tls, api_key)
    if api_key is None:
        api_key = os.environ.get(auth.ENV_KEY) or None
    return Target(address, transport.from_env() if tls is None else tls, api_key)


class GatewayError(Exception):
    """A failed gateway call: `code` (grpc.StatusCode), `details` (the server's message) and
    `retry_after_s` (set with RESOURCE_EXHAUSTED when the server sent a hint)."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None = None):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.retry_after_s = code, details, retry_after_s


def _retry_after(trailing) -> float | None:
    return transport.retry_after(trailing)


@dataclasses.dataclass(frozen=True)
class Token:
    """One generated token; the last message of a stream has `finish_reason` ("stop", "eos" or
    "length") and `prompt_tokens`, and may carry no token (`token_id` -1). `pathway`: the
    pathway generating it, `routed`: whether a DiPaCo router chose it (a request naming no
    pathway, or a routed family, on a DiPaCo checkpoint)."""

    token_id: int
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    pathway: str = ""
    routed: bool = False


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    pathway: str = ""  # the pathway that generated it (a routed request: its path)
    routed: bool = False


@dataclasses.dataclass(frozen=True)
class Pathway:
    """A catalog entry: what the pathway costs and, once measured, how it performs. A routed
    family (a DiPaCo checkpoint's; a request naming it goes to one path) has its `paths` and
    no modules; a path of one names its `family`."""

    name: str
    modules: list[str]
    max_seq_len: int
    parameters: int
    weight_bytes: int
    tokens_per_s: float | None
    eval_loss: float | None
    paths: list[str] = dataclasses.field(default_factory=list)
    family: str = ""


@dataclasses.dataclass(frozen=True)
class Embedding:
    """A text's embedding: the pathway's last hidden state before its head, mean-pooled."""

    vector: list[float]
    prompt_tokens: int = 0  # the text's tokens (0 from a gateway older than the field)
    pathway: str = ""  # the pathway that ran (a routed text: its path)
    routed: bool = False


def _infer_request(text: str, pathway: str):
    if getattr(gateway_pb2, "InferRequest", None) is None:
        raise GatewayError(
            grpc.StatusCode.UNIMPLEMENTED, "this gateway API has no Infer RPC (embeddings)"
        )
    return gateway_pb2.InferRequest(
        pathway=pathway, text=text, output=gateway_pb2.InferRequest.OUTPUT_EMBEDDING
    )


_EMBEDDING_RESULT = "embedding"  # InferResponse's oneof field (not the module kind)


def _embedding(r) -> Embedding:
    from pathways import codec  # numpy and jax's dtypes: only for embeddings

    if r.WhichOneof("result") != _EMBEDDING_RESULT:
        raise GatewayError(
            grpc.StatusCode.INTERNAL, f"Infer returned {r.WhichOneof('result')}, not an embedding"
        )
    x = codec.decode(r.embedding, "embedding")  # (1, d_model)
    return Embedding([float(v) for v in x.reshape(-1)], r.prompt_tokens, r.pathway, r.routed)


@dataclasses.dataclass(frozen=True)
class Catalog:
    pathways: list[Pathway]
    chat_template: chat.ChatTemplate | None  # the checkpoint's (None: it stores none)


def request(
    prompt: str,
    *,
    pathway: str = "",
    max_tokens: int | None = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float | None = None,
    seed: int = 0,
    stop: Sequence[str] = (),
) -> gateway_pb2.GenerateRequest:
    """A GenerateRequest (the gateway checks the values and names the bad one); `max_tokens`
    None: the gateway's default (64)."""
    opts = messages.sampling_options(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        max_new_tokens=max_tokens,
        stop=stop,
    )
    return gateway_pb2.GenerateRequest(pathway=pathway, prompt=prompt, sampling=opts)


def _token(m: gateway_pb2.GenerateResponse) -> Token:
    return Token(m.token_id, m.text, m.finish_reason or None, m.prompt_tokens, m.pathway, m.routed)


def _catalog(r: gateway_pb2.ListPathwaysResponse) -> Catalog:
    pathways = [
        Pathway(
            p.name,
            list(p.modules),
            p.max_seq_len,
            p.parameters,
            p.weight_bytes,
            p.tokens_per_s if p.HasField("tokens_per_s") else None,
            p.eval_loss if p.HasField("eval_loss") else None,
            list(p.paths),
            p.family,
        )
        for p in r.pathways
    ]
    template = None
    if r.chat_template:
        import json

        template = chat.ChatTemplate.from_dict(json.loads(r.chat_template))
    return Catalog(pathways, template)


def _collect(tokens) -> Completion:
    text, ids, reason, n_prompt, pathway, routed = [], [], "", 0, "", False
    for t in tokens:
        text.append(t.text)
        if t.token_id >= 0:
            ids.append(t.token_id)
        if t.finish_reason:
            reason, n_prompt = t.finish_reason, t.prompt_tokens
        pathway, routed = t.pathway, t.routed
    return Completion("".join(text), ids, reason, n_prompt, pathway, routed)


class _Base:
    def __init__(self, address, api_key, tls, timeout):
        self.target = target(address, api_key, tls)
        self.timeout = timeout

    @property
    def address(self) -> str:
        return self.target.address

    def _md(self, api_key: str | None):
        return auth.client_metadata(api_key) if api_key is not None else self.target.metadata


class Client(_Base):
    """Blocking client; one channel, safe to share between threads."""

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        tls: transport.TLSConfig | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        options: Sequence[tuple[str, object]] = (),
    ):
        super().__init__(address, api_key, tls, timeout)
        self.channel = telemetry.channel(
            transport.channel(self.target.address, with_retries(options), self.target.tls)
        )
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)

    def generate(
        self, prompt: str, *, timeout: float | None = None, api_key: str | None = None, **sampling
    ) -> Iterator[Token]:
        """Streams tokens as the gateway generates them (`sampling`: see `request`). Closing
        the iterator early cancels the call, and the gateway closes the session."""
        call = self.stub.Generate(
            request(prompt, **sampling), timeout=timeout or self.timeout, metadata=self._md(api_key)
        )
        try:
            for m in call:
                yield _token(m)
        except grpc.RpcError as e:
            raise GatewayError(e.code(), e.details(), _retry_after(e.trailing_metadata())) from None
        finally:
            call.cancel()  # no-op once the stream has ended

    def complete(self, prompt: str, **kwargs) -> Completion:
        """The whole generation at once."""
        return _collect(self.generate(prompt, **kwargs))

    def catalog(self, api_key: str | None = None) -> Catalog:
        try:
            r = self.stub.ListPathways(
                gateway_pb2.ListPathwaysRequest(), timeout=self.timeout, metadata=self._md(api_key)
            )
        except grpc.RpcError as e:
            raise GatewayError(e.code(), e.details()) from None
        return _catalog(r)

    def pathways(self, api_key: str | None = None) -> list[Pathway]:
        return self.catalog(api_key).pathways

    def embed(self, text: str, *, pathway: str = "", api_key: str | None = None) -> Embedding:
        """`text`'s embedding through the gateway's Infer RPC."""
        req = _infer_request(text, pathway)
        try:
            r = self.stub.Infer(req, timeout=self.timeout, metadata=self._md(api_key))
        except grpc.RpcError as e:
            raise GatewayError(e.code(), e.details(), _retry_after(e.trailing_metadata())) from None
        return _embedding(r)

    def remove_pathway(self, name: str, api_key: str | None = None) -> None:
        """Admin: the gateway stops serving pathway `name` (streams on it finish)."""
        try:
            self.stub.RemovePathway(
                gateway_pb2.RemovePathwayRequest(name=name),
                timeout=self.timeout,
                metadata=self._md(api_key),
            )
        except grpc.RpcError as e:
            raise GatewayError(e.code(), e.details()) from None

    def episode(self, pathway: str = "", api_key: str | None = None) -> Episode:
        """An episode of a pathway that acts (`Episode`): one observation in, one action out."""
        return Episode(self, pathway, api_key)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Episode:
    """An episode of a pathway that acts (observations in, actions out), run by the gateway:
    its window of steps stays in the module servers' KV caches between calls. A policy for
    `pathways.robotics.policy.rollout` (`reset`, `act`, `close`):

        with Client() as c:
            ep = c.episode("reacher")
            action = ep.act(observation)     # one observation (obs_dim floats) -> one action
            ep.close()

    `reset()` ends the episode; the next `act` starts a new one (as `pathway`, or the first
    served pathway acting on observations of that size). Actions are an int (a discrete head)
    or a float32 vector in [-1, 1] (a continuous one)."""

    def __init__(self, client: Client, pathway: str = "", api_key: str | None = None):
        self.client, self.pathway, self.api_key = client, pathway, api_key
        self.session_id = ""
        self.last = None  # the last step's gateway_pb2.Action (values, step)

    def step(self, obs):
        """The gateway's Action for one observation (choice, values, discrete, step)."""
        import numpy as np

        from pathways import codec

        req = gateway_pb2.InferRequest(
            pathway=self.pathway,
            tensor=codec.encode(np.asarray(obs)),
            session_id=self.session_id,
            start_session=not self.session_id,
        )
        c = self.client
        try:
            r = c.stub.Infer(req, timeout=c.timeout, metadata=c._md(self.api_key))
        except grpc.RpcError as e:
            raise GatewayError(e.code(), e.details(), _retry_after(e.trailing_metadata())) from None
        if r.WhichOneof("result") != "actions" or len(r.actions.items) != 1:
            raise GatewayError(
                grpc.StatusCode.INTERNAL, f"Infer returned {r.WhichOneof('result')}, not an action"
            )
        self.session_id, self.pathway = r.session_id, r.pathway
        self.last = r.actions.items[0]
        return self.last

    def act(self, obs):
        import numpy as np

        a = self.step(obs)
        return int(a.choice) if a.discrete else np.asarray(a.values, np.float32)

    def reset(self) -> None:
        self.close()

    def close(self) -> None:
        """Ends the episode on the gateway (frees its KV-cache slots); idempotent."""
        if self.session_id:
            key, self.session_id = self.session_id, ""
            c = self.client
            try:
                c.stub.Infer(
                    gateway_pb2.InferRequest(session_id=key, end_session=True),
                    timeout=c.timeout,
                    metadata=c._md(self.api_key),
                )
            except grpc.RpcError as e:
                raise GatewayError(e.code(), e.details()) from None


class AsyncClient(_Base):
    """asyncio client (grpc.aio); create and use it inside one event loop."""

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        tls: transport.TLSConfig | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        options: Sequence[tuple[str, object]] = (),
    ):
        super().__init__(address, api_key, tls, timeout)
        self.channel = transport.aio_channel(
            self.target.address,
            with_retries(options),
            self.target.tls,
            telemetry.aio_interceptors(),
        )
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)

    async def generate(
        self, prompt: str, *, timeout: float | None = None, api_key: str | None = None, **sampling
    ) -> AsyncIterator[Token]:
        """Streams tokens (see Client.generate). Cancelling the task that iterates, or closing
        the iterator, cancels the call."""
        call = self.stub.Generate(
            request(prompt, **sampling), timeout=timeout or self.timeout, metadata=self._md(api_key)
        )
        try:
            async for m in call:
                yield _token(m)
        except grpc.RpcError as e:
            raise GatewayError(e.code(), e.details(), _retry_after(e.trailing_metadata())) from None
        finally:
            call.cancel()

    async def complete(self, prompt: str, **kwargs) -> Completion:
        return _collect([t async for t in self.generate(prompt, **kwargs)])

    async def catalog(self, api_key: str | None = None) -> Catalog:
        try:
            r = await self.stub.ListPathways(
                gateway_pb2.ListPathwaysRequest(), timeout=self.timeout, metadata=self._md(api_key)
            )
        except grpc.RpcError as e:
            raise GatewayError(e.code(), e.details()) from None
        return _catalog(r)

    async def pathways(self, api_key: str | None = None) -> list[Pathway]:
        return (await self.catalog(api_key)).pathways

    async def embed(self, text: str, *, pathway: str = "", api_key: str | None = None) -> Embedding:
        req = _infer_request(text, pathway)
        try:
            r = await self.stub.Infer(req, timeout=self.timeout, metadata=self._md(api_key))
        except grpc.RpcError as e:
            raise GatewayError(e.code(), e.details(), _retry_after(e.trailing_metadata())) from None
        return _embedding(r)

    async def remove_pathway(self, name: str, api_key: str | None = None) -> None:
        """Admin: see Client.remove_pathway."""
        try:
            await self.stub.RemovePathway(
                gateway_pb2.RemovePathwayRequest(name=name),
                timeout=self.timeout,
                metadata=self._md(api_key),
            )
        except grpc.RpcError as e:
            raise GatewayError(e.code(), e.details()) from None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
