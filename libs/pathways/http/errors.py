"""OpenAI's error JSON and the HTTP status of each failure, gRPC statuses of the gateway included."""

from __future__ import annotations

import math

import grpc
from starlette.responses import JSONResponse

# gRPC status of a gateway call -> (HTTP status, OpenAI error type).
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    # Not the HTTP client's doing (the front cancels a call only when its client has gone, and
    # then answers nobody): the gateway was shutting down when the call reached it.
    grpc.StatusCode.CANCELLED: (503, "service_unavailable"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
}
DEFAULT_RETRY_AFTER_S = 1


class APIError(Exception):
    """A request that fails with `status` and OpenAI's {"error": {...}} body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad(param: str, message: str, code: str | None = "invalid_value") -> APIError:
    """400 naming the request field at fault."""
    return APIError(400, f"{param}: {message}", param=param, code=code)


def from_gateway(e, endpoint_param: str = "prompt") -> APIError:
    """The APIError of a failed gateway call (`pathways.client.GatewayError`). 429 and its
    Retry-After only for RESOURCE_EXHAUSTED of the servers at capacity (the module server's hint,
    passed on by the gateway, rounded up to whole seconds; also exact as `retry-after-ms`, which
    OpenAI's SDKs read first). A module server's bounds on one call are not capacity: waiting
    does not help, so no 429 and no Retry-After. Over max_call_tokens (rows x positions) the
    call is too large: 413. Over max_programs (distinct compiled shapes per server, reached
    once and kept until the server restarts) the request's shape is one the server no longer
    compiles: 400, naming the prompt (its length decides the shape)."""
    status, kind = STATUS.get(e.code, (500, "server_error"))
    param = code = None
    headers = {}
    if e.code == grpc.StatusCode.NOT_FOUND and "pathway" in e.details:
        param, code = "model", "model_not_found"
    elif e.code == grpc.StatusCode.INVALID_ARGUMENT and "max sequence length" in e.details:
        param, code = endpoint_param, "context_length_exceeded"
    elif e.code == grpc.StatusCode.INVALID_ARGUMENT and e.details.startswith("sampling: "):
        param = e.details[len("sampling: ") :].split(" ", 1)[0].rstrip(":")
    elif e.code == grpc.StatusCode.UNAUTHENTICATED:
        code = "invalid_api_key"
    elif e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_call_tokens" in e.details:
        # A module server's size limit on one call (prompt rows x positions), not its capacity:
        # the same request would fail again, so no 429 / Retry-After.
        status, kind = 413, "invalid_request_error"
        param, code = endpoint_param, "request_too_large"
    elif e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_programs" in e.details:
        status, kind = 400, "invalid_request_error"
        param, code = endpoint_param, "max_programs_exceeded"
    elif e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        wait = e.retry_after_s if e.retry_after_s else DEFAULT_RETRY_AFTER_S
        headers["Retry-After"] = str(max(1, math.ceil(wait)))
        if e.retry_after_s:
            headers["retry-after-ms"] = str(max(1, round(e.retry_after_s * 1000)))
        code = "servers_at_capacity"
    return APIError(status, e.details, type=kind, param=param, code=code, headers=headers)
