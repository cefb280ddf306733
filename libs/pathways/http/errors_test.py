"""Status and body of each failure: gRPC statuses of the gateway -> HTTP (429 and Retry-After only
for RESOURCE_EXHAUSTED), request checks -> 400 naming the field."""

from __future__ import annotations

import grpc
import pytest

from pathways.client import GatewayError
from pathways.http import params
from pathways.http.errors import APIError, from_gateway


@pytest.mark.parametrize(
    "code, status",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.CANCELLED, 503),  # a gateway shutting down; the client did not cancel
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_gateway_statuses_map_to_http(code, status):
    e = from_gateway(GatewayError(code, "why"))
    assert e.status == status and e.body()["error"]["message"] == "why"
    assert ("Retry-After" in e.headers) == (status == 429)


def test_retry_after_rounds_the_servers_hint_up():
    e = from_gateway(GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", 2.2))
    assert e.headers["Retry-After"] == "3" and e.headers["retry-after-ms"] == "2200"
    e = from_gateway(GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"))  # no hint
    assert e.headers == {"Retry-After": "1"}
    e = from_gateway(GatewayError(grpc.StatusCode.PERMISSION_DENIED, "Generate needs role"))
    assert e.status == 403 and e.type == "permission_error" and not e.headers


def test_a_call_over_max_call_tokens_is_413_not_429():
    msg = (
        "module 'attn-0' at 127.0.0.1:5: RESOURCE_EXHAUSTED: x has 1 rows x 900 positions = "
        "900, over max_call_tokens = 512 (--max-call-tokens / PATHWAYS_MAX_CALL_TOKENS)"
    )
    e = from_gateway(GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, msg), "messages")
    assert (e.status, e.param, e.code) == (413, "messages", "request_too_large")
    assert "Retry-After" not in e.headers and "max_call_tokens = 512" in e.message


def test_a_shape_over_max_programs_is_400_not_429():
    msg = (
        "module 'attn' at 127.0.0.1:5: this server has compiled max_programs = 12 distinct "
        "shapes; step with shapes (1, 64, 32) would compile another (send shapes the server "
        "already runs, or raise --max-programs / PATHWAYS_MAX_PROGRAMS)"
    )
    e = from_gateway(GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, msg, 1.0), "prompt")
    assert (e.status, e.type, e.param, e.code) == (
        400,
        "invalid_request_error",
        "prompt",
        "max_programs_exceeded",
    )
    assert not e.headers and "max_programs = 12" in e.message


def test_gateway_messages_name_the_field():
    e = from_gateway(GatewayError(grpc.StatusCode.NOT_FOUND, "unknown pathway 'x'; serves: a"))
    assert (e.param, e.code) == ("model", "model_not_found")
    msg = "max sequence length exceeded: prompt 0 has 9 tokens + max_new_tokens 300 > 256"
    e = from_gateway(GatewayError(grpc.StatusCode.INVALID_ARGUMENT, msg), "messages")
    assert (e.param, e.code) == ("messages", "context_length_exceeded")


def test_defaults_and_accepted_values():
    g = params.generation({"model": "m", "prompt": "x"}, params.COMPLETION_FIELDS, 16)
    assert g.sampling == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "seed": 0,
        "stop": [],
        "max_tokens": 16,
    }
    body = {"model": "m", "messages": [], "max_completion_tokens": 5, "stop": "\n", "n": 1}
    g = params.generation({**body, "presence_penalty": 0}, params.CHAT_FIELDS, None)
    assert g.sampling["max_tokens"] == 5 and g.sampling["stop"] == ["\n"]


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 3}, "n"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"user": 3}, "user"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 3, "max_completion_tokens": 3}, "max_completion_tokens"),
    ],
)
def test_bad_values_name_their_field(extra, param):
    with pytest.raises(APIError) as e:
        params.generation({"model": "m", **extra}, params.CHAT_FIELDS, None)
    assert e.value.status == 400 and e.value.param == param and param in e.value.message


def test_embedding_inputs():
    assert params.embedding_inputs({"model": "m", "input": "a"}) == ("m", ["a"], "float")
    for body, param in [
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": [""]}, "input"),
        ({"model": "m", "input": "a", "dimensions": 8}, "dimensions"),
        ({"input": "a"}, "model"),
    ]:
        with pytest.raises(APIError) as e:
            params.embedding_inputs(body)
        assert e.value.param == param
