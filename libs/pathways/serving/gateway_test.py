"""How the gateway ends a call that a module server failed (`_abort_remote`), on a real gRPC
server: the module's status and message, CANCELLED as UNAVAILABLE, the retry hint passed on."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from pathways import transport
from pathways.executor.replicas import RemoteError
from pathways.serving.gateway import _abort_remote


@pytest.fixture(scope="module")
def call():
    """Calls a method that aborts with `_abort_remote(RemoteError(code, message, retry))`."""
    errors: dict[bytes, RemoteError] = {}

    def handler(request: bytes, context):
        _abort_remote(context, errors[request])

    methods = {"Fail": grpc.unary_unary_rpc_method_handler(handler)}
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Gateway", methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    fail = channel.unary_unary("/t.Gateway/Fail")

    def run(e: RemoteError) -> grpc.RpcError:
        key = str(len(errors)).encode()
        errors[key] = e
        with pytest.raises(grpc.RpcError) as got:
            fail(key, timeout=10)
        return got.value

    yield run
    channel.close()
    server.stop(None)


def test_a_module_status_and_message_pass_through(call):
    e = call(RemoteError(grpc.StatusCode.INVALID_ARGUMENT, "module 'attn-0' at h:1: token id 300"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "module 'attn-0' at h:1: token id 300"


def test_a_call_a_module_server_cancelled_is_unavailable_to_the_caller(call):
    # The caller did not cancel: the module server was shutting down.
    e = call(RemoteError(grpc.StatusCode.CANCELLED, "module 'attn-0' at h:1: CANCELLED"))
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    assert e.details() == "module 'attn-0' at h:1: CANCELLED"


def test_the_retry_hint_is_passed_on(call):
    e = call(RemoteError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full; retry after 1.5 s", 1.5))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert transport.retry_after(e.trailing_metadata()) == pytest.approx(1.5)
