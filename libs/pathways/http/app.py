"""The OpenAI-compatible HTTP front (FastAPI): /v1/models (DELETE: admin), /v1/completions,
/v1/chat/completions (server-sent events with `stream`), /v1/embeddings, /metrics, /healthz and
/readyz. It talks only to the gateway (`pathways.client.AsyncClient`), passing on the caller's
`Authorization: Bearer KEY`, so the gateway's keys and roles decide. A client that goes away
mid-stream cancels the gRPC call, and the gateway closes the session on every module."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import struct
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pathways import catalog, chat, client, metrics, telemetry, transport
from pathways.http import params
from pathways.http.errors import APIError, bad, from_gateway

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
# Completion response headers: the pathway that generated, and whether a DiPaCo router chose it.
PATHWAY_HEADER, ROUTED_HEADER = "X-Pathways-Pathway", "X-Pathways-Routed"
DONE = b"data: [DONE]\n\n"


@dataclasses.dataclass(frozen=True)
class Settings:
    gateway: str  # host:port of the gRPC gateway
    tls: transport.TLSConfig  # how to reach it (its CA; plaintext when insecure)
    max_body_bytes: int = 1 << 20  # bigger request bodies get 413
    timeout_s: float = 300.0  # deadline of each gateway call
    completion_tokens: int = 16  # /v1/completions' max_tokens when not given (OpenAI's)
    template_ttl_s: float = 30.0  # how long the gateway's chat template is reused

    def __post_init__(self):
        if not self.gateway:
            raise ValueError("the HTTP front needs a gateway address (--gateway HOST:PORT)")
        if self.max_body_bytes <= 0 or self.timeout_s <= 0:
            raise ValueError(
                f"max_body_bytes and timeout_s must be > 0; got {self.max_body_bytes}, "
                f"{self.timeout_s}"
            )


def _key(request: Request) -> str:
    """The caller's API key ('' without one; the gateway then answers UNAUTHENTICATED)."""
    value = request.headers.get("authorization")
    if value is None:
        return ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401,
            "the Authorization header must be 'Bearer <API key>'",
            type="authentication_error",
            code="invalid_api_key",
        )
    return token.strip()


async def _body(request: Request, limit: int) -> Any:
    """The JSON body, at most `limit` bytes (413 beyond, 400 if not JSON)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(
            413,
            f"request body of {int(length)} bytes exceeds the limit of {limit} bytes",
            code="request_too_large",
        )
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(
                413, f"request body exceeds the limit of {limit} bytes", code="request_too_large"
            )
    try:
        return json.loads(data)
    except ValueError as e:
        raise bad("body", f"not valid JSON ({e})", code="invalid_json") from None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class Front:
    """The endpoints' state: settings, the gateway client (made in the app's event loop), the
    metrics and the cached chat template."""

    def __init__(self, settings: Settings, http_metrics: metrics.HttpMetrics):
        self.s, self.m = settings, http_metrics
        self.gw: client.AsyncClient | None = None
        self._template: tuple[float, chat.ChatTemplate] | None = None

    async def template(self, key: str) -> chat.ChatTemplate:
        now = time.monotonic()
        if self._template is None or now - self._template[0] > self.s.template_ttl_s:
            cat = await self._call(self.gw.catalog(api_key=key), "messages")
            self._template = (now, cat.chat_template or chat.DEFAULT)
        return self._template[1]

    @staticmethod
    async def _call(coro, param: str):
        try:
            return await coro
        except client.GatewayError as e:
            raise from_gateway(e, param) from None

    async def models(self, key: str) -> list[dict]:
        cat = await self._call(self.gw.catalog(api_key=key), "model")
        return [
            {
                "id": p.name,
                "object": "model",
                "created": 0,
                "owned_by": "pathways",
                "pathway": {
                    "modules": p.modules,
                    "parameters": p.parameters,
                    "weight_bytes": p.weight_bytes,
                    "max_context": p.max_seq_len,
                    "tokens_per_s": p.tokens_per_s,
                    "eval_loss": p.eval_loss,
                    # A routed family: its paths (a request naming it runs on one); a path: its
                    # family (None for other pathways).
                    "paths": p.paths or None,
                    "family": p.family or None,
                },
            }
            for p in cat.pathways
        ]

    async def route(self, bounds: dict, key: str) -> str:
        """`model: "auto"`: the pathway catalog.choose picks within `bounds`."""
        cat = await self._call(self.gw.catalog(api_key=key), "model")
        try:
            return catalog.choose(cat.pathways, **bounds).name
        except catalog.NoPathway as e:
            raise bad(e.param, str(e), code="no_pathway_meets_constraints") from None

    async def generate(self, g: params.Generation, prompt: str, key: str, kind: str, param: str):
        """A completion ("text_completion") or chat completion ("chat.completion"), whole or as
        server-sent events. The first token (or the gateway's error) is awaited before the
        response starts, so failures keep their status."""
        if g.model == "auto":
            g = dataclasses.replace(g, model=await self.route(g.route, key))
        rec = self.m.start(g.model)
        tokens = self.gw.generate(
            prompt, pathway=g.model, timeout=self.s.timeout_s, api_key=key, **g.sampling
        )
        try:
            first = await anext(tokens, None)
        except client.GatewayError as e:
            rec.finish()
            raise from_gateway(e, param) from None
        except BaseException:
            rec.finish()
            raise
        ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        # The response's `model` is the pathway that generated (a routed request: its path);
        # the headers say so too, and whether a router chose it.
        served = first.pathway if first is not None and first.pathway else g.model
        routed = first is not None and first.routed
        headers = {PATHWAY_HEADER: served, ROUTED_HEADER: "true" if routed else "false"}
        g = dataclasses.replace(g, model=served)
        if not g.stream:
            try:
                out = await self._whole(first, tokens, rec, g, ident, created, kind, param)
            finally:
                rec.finish()
            out.headers.update(headers)
            return out
        return StreamingResponse(
            self._events(first, tokens, rec, g, ident, created, kind),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )

    async def _whole(self, first, tokens, rec, g, ident, created, kind, param) -> JSONResponse:
        text, n, reason, n_prompt = [], 0, "length", 0
        tok = first
        try:
            while tok is not None:
                if tok.token_id >= 0:
                    n += 1
                    rec.token()
                text.append(tok.text)
                if tok.finish_reason:
                    reason, n_prompt = FINISH.get(tok.finish_reason, "stop"), tok.prompt_tokens
                tok = await anext(tokens, None)
        except client.GatewayError as e:
            raise from_gateway(e, param) from None
        body = "".join(text)
        if kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": body},
                "logprobs": None,
                "finish_reason": reason,
            }
        else:
            choice = {"index": 0, "text": body, "logprobs": None, "finish_reason": reason}
        return JSONResponse(
            {
                "id": ident,
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": created,
                "model": g.model,
                "system_fingerprint": None,
                "choices": [choice],
                "usage": _usage(n_prompt, n),
            }
        )

    async def _events(self, first, tokens, rec, g, ident, created, kind):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        head = {"id": ident, "object": obj, "created": created, "model": g.model}
        head["system_fingerprint"] = None

        def chunk(text: str | None, reason: str | None, role: bool = False) -> bytes:
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                if role:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None}
                choice["finish_reason"] = reason
            return _sse({**head, "choices": [choice]})

        n, tok = 0, first
        try:
            if kind == "chat":
                yield chunk("", None, role=True)
            while tok is not None:
                if tok.token_id >= 0:  # one event per token, its text "" mid-character
                    n += 1
                    rec.token()
                    yield chunk(tok.text, None)
                elif tok.text:
                    yield chunk(tok.text, None)
                if tok.finish_reason:
                    yield chunk(None if kind == "chat" else "", FINISH.get(tok.finish_reason))
                    if g.include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(tok.prompt_tokens, n)})
                tok = await anext(tokens, None)
            yield DONE
        except client.GatewayError as e:
            yield _sse(from_gateway(e).body())
            yield DONE
        finally:
            rec.finish()
            await tokens.aclose()  # a client that went away: the gRPC call is cancelled

    async def embeddings(self, model: str, texts: list[str], key: str, encoding: str) -> dict:
        vectors = await asyncio.gather(
            *(self._call(self.gw.embed(t, pathway=model, api_key=key), "input") for t in texts)
        )

        tokens = sum(v.prompt_tokens for v in vectors)  # each text's tokens, as Infer read them
        # A routed family's texts may go to different paths: each item names its own; `model`
        # is the one pathway that ran them all, else the family asked for.
        ran = {v.pathway for v in vectors if v.pathway}

        def encode(v: list[float]):
            if encoding == "base64":  # little-endian float32, as OpenAI sends it
                return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
            return v

        return {
            "object": "list",
            "data": [
                dict(
                    object="embedding",
                    index=i,
                    embedding=encode(v.vector),
                    pathway=v.pathway or model,
                )
                for i, v in enumerate(vectors)
            ],
            "model": ran.pop() if len(ran) == 1 else model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def create_app(settings: Settings) -> FastAPI:
    """The ASGI app; its gateway channel opens with the app's event loop (lifespan). Request
    counts, latency and server spans (joined to the caller's W3C trace context, continued to
    the gateway by the gRPC client interceptors) are FastAPI's own OpenTelemetry telemetry
    (`http_server_request_duration_seconds`, `http_server_active_requests`); HttpMetrics adds
    time to first token, tokens/s, tokens and streams in flight."""
    telemetry.init("pathways-http-front", prometheus=True)
    http_metrics = metrics.HttpMetrics()
    front = Front(settings, http_metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        front.gw = client.AsyncClient(
            settings.gateway, api_key="", tls=settings.tls, timeout=settings.timeout_s
        )
        try:
            yield
        finally:
            await front.gw.close()

    app = FastAPI(title="Pathways", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.front = front

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type=kind).response()

    @app.get("/v1/models")
    async def list_models(request: Request):
        return {"object": "list", "data": await front.models(_key(request))}

    @app.get("/v1/models/{model}")
    async def get_model(model: str, request: Request):
        for m in await front.models(_key(request)):
            if m["id"] == model:
                return m
        raise APIError(
            404,
            f"unknown model {model!r}",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )

    @app.delete("/v1/models/{model}")
    async def delete_model(model: str, request: Request):
        """OpenAI's model deletion: the gateway stops serving the pathway (RemovePathway, an
        admin key's; a generate key gets 403). The checkpoint's weights stay."""
        await front._call(front.gw.remove_pathway(model, api_key=_key(request)), "model")
        return {"id": model, "object": "model", "deleted": True}

    @app.post("/v1/completions")
    async def completions(request: Request):
        key = _key(request)
        body = await _body(request, settings.max_body_bytes)
        g = params.generation(body, params.COMPLETION_FIELDS, settings.completion_tokens)
        g = dataclasses.replace(g, route=params.route(body, request.headers))
        return await front.generate(g, params.prompt(body), key, "text", "prompt")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        key = _key(request)
        body = await _body(request, settings.max_body_bytes)
        g = params.generation(body, params.CHAT_FIELDS, None)
        g = dataclasses.replace(g, route=params.route(body, request.headers))
        template = await front.template(key)
        try:
            prompt = template.render(body.get("messages"))
        except chat.ChatError as e:
            raise bad(e.param, str(e).split(": ", 1)[-1]) from None
        if template.stop:
            stops = list(g.sampling["stop"]) + [
                s for s in template.stop if s not in g.sampling["stop"]
            ]
            g = dataclasses.replace(g, sampling={**g.sampling, "stop": stops})
        return await front.generate(g, prompt, key, "chat", "messages")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        key = _key(request)
        body = await _body(request, settings.max_body_bytes)
        model, texts, encoding = params.embedding_inputs(body)
        return await front.embeddings(model, texts, key, encoding)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            r = await health_pb2_grpc.HealthStub(front.gw.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2.0
            )
            ok = r.status == health_pb2.HealthCheckResponse.SERVING
        except Exception as e:  # any failure to reach the gateway: not ready
            return JSONResponse({"status": "gateway unreachable", "error": str(e)}, 503)
        if not ok:
            return JSONResponse({"status": "gateway not serving"}, 503)
        return {"status": "ok", "gateway": settings.gateway}

    return app
