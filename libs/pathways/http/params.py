"""OpenAI request bodies -> the gateway's generation settings; every bad value is a 400 naming
its field (`errors.bad`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pathways.http.errors import bad

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_SEED = 2**63 - 1
# Fields OpenAI defines that change nothing here at these values; other values are refused
# (the field is named) rather than silently ignored.
NEUTRAL = {
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
}
COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed"}
COMMON |= {"stop", "n", "user", "top_k", "max_ms_per_token", "max_parameters"}
# `model: "auto"`: the best pathway within these bounds (body fields, or these headers).
ROUTE_HEADERS = {
    "max_ms_per_token": "x-pathways-max-ms-per-token",
    "max_parameters": "x-pathways-max-parameters",
}
COMPLETION_FIELDS = COMMON | {"prompt"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}


@dataclasses.dataclass(frozen=True)
class Generation:
    """One validated completion request."""

    model: str  # a pathway, or "auto" (see `route`)
    stream: bool
    include_usage: bool
    sampling: dict[str, Any]  # pathways.client.request's keyword arguments
    user: str | None
    route: dict[str, float | int | None] = dataclasses.field(default_factory=dict)


def _number(body, name, default, lo=None, hi=None, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise bad(name, f"must be a number; got {v!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise bad(name, f"must be {'>' if lo_open else '>='} {lo}; got {v!r}")
    if hi is not None and v > hi:
        raise bad(name, f"must be <= {hi}; got {v!r}")
    return float(v)


def _int(body, name, default, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"must be an integer; got {v!r}")
    if lo is not None and v < lo:
        raise bad(name, f"must be >= {lo}; got {v!r}")
    if hi is not None and v > hi:
        raise bad(name, f"must be <= {hi}; got {v!r}")
    return v


def _stop(body) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("stop", "must be a string or a list of strings")
    if len(items) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} sequences; got {len(items)}")
    if any(not s for s in items):
        raise bad("stop", "sequences must not be empty")
    return items


def _check_fields(body: dict, allowed: set[str]) -> None:
    for k, v in body.items():
        if k in allowed:
            continue
        if k in NEUTRAL:
            if v not in NEUTRAL[k]:
                raise bad(k, f"is not supported (got {v!r})", code="unsupported_parameter")
            continue
        raise bad(k, "unrecognized request argument", code="unknown_parameter")


def generation(body: Any, allowed: set[str], default_max_tokens: int | None) -> Generation:
    """The settings shared by /v1/completions and /v1/chat/completions."""
    if not isinstance(body, dict):
        raise bad("body", "must be a JSON object", code="invalid_json")
    _check_fields(body, allowed)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "is required (a model id from GET /v1/models)")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad("n", f"only n=1 is supported; got {n!r}", code="unsupported_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("stream", f"must be a boolean; got {stream!r}")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise bad("stream_options", 'must be {"include_usage": true|false}')
        if not stream:
            raise bad("stream_options", "only applies with stream: true")
        include_usage = bool(opts.get("include_usage", False))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", "must be a string")
    max_field = "max_tokens"
    if body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None:
            raise bad("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        max_field = "max_completion_tokens"
    max_tokens = _int(body, max_field, default_max_tokens, lo=1, hi=2**31 - 1)
    sampling = {
        "temperature": _number(body, "temperature", 1.0, lo=0, hi=2),
        "top_p": _number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True),
        "top_k": _int(body, "top_k", 0, lo=0, hi=2**31 - 1),
        "seed": _int(body, "seed", 0, lo=0, hi=MAX_SEED),
        "stop": _stop(body),
        "max_tokens": max_tokens,
    }
    return Generation(model, bool(stream), include_usage, sampling, user)


def route(body: dict, headers) -> dict[str, float | int | None]:
    """`model: "auto"`'s bounds from the body (`max_ms_per_token`, `max_parameters`) or the
    x-pathways-* headers; 400 naming the field for a bad value, or for a bound without auto."""
    out: dict[str, float | int | None] = {}
    for name, header in ROUTE_HEADERS.items():
        v = body.get(name)
        if v is None and headers.get(header) is not None:
            raw = headers.get(header)
            try:
                v = float(raw) if name == "max_ms_per_token" else int(raw)
            except ValueError:
                raise bad(name, f"header {header} must be a number; got {raw!r}") from None
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise bad(name, f"must be a positive number; got {v!r}")
        if name == "max_parameters" and not float(v).is_integer():
            raise bad(name, f"must be an integer; got {v!r}")
        out[name] = float(v) if name == "max_ms_per_token" else int(v)
    if out and body.get("model") != "auto":
        raise bad(next(iter(out)), 'applies only with model: "auto"')
    return out


def prompt(body: dict) -> str:
    """/v1/completions' prompt: a string (or a list holding one)."""
    p = body.get("prompt")
    if isinstance(p, list):
        if len(p) != 1 or not isinstance(p[0], str):
            raise bad(
                "prompt",
                "must be a string or a list of one string (token-id and batched prompts are "
                "not supported)",
                code="unsupported_value",
            )
        p = p[0]
    if not isinstance(p, str):
        raise bad("prompt", "is required: a string")
    return p


def embedding_inputs(body: Any) -> tuple[str, list[str], str]:
    """/v1/embeddings: (model, texts, encoding "float" or "base64")."""
    if not isinstance(body, dict):
        raise bad("body", "must be a JSON object", code="invalid_json")
    for k, v in body.items():
        if k in ("model", "input", "user"):
            continue
        if k == "encoding_format" and v in (None, "float", "base64"):
            continue
        if k == "encoding_format":
            raise bad(k, f"must be 'float' or 'base64'; got {v!r}", code="unsupported_value")
        if k == "dimensions" and v is None:
            continue
        raise bad(k, "unrecognized or unsupported request argument", code="unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "is required (a model id from GET /v1/models)")
    x = body.get("input")
    texts = [x] if isinstance(x, str) else x
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad("input", "must be a string or a non-empty list of strings")
    if any(not t for t in texts):
        raise bad("input", "strings must not be empty")
    return model, texts, body.get("encoding_format") or "float"
