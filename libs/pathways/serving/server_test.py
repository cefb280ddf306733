"""Server options: a port already served is refused, not shared."""

from concurrent import futures

import grpc
import pytest

from pathways.deploy.launcher import free_port
from pathways.transport import server_options


def test_a_second_server_on_a_taken_port_fails_to_bind():
    port = free_port()
    first = grpc.server(futures.ThreadPoolExecutor(1), options=server_options(1))
    second = grpc.server(futures.ThreadPoolExecutor(1), options=server_options(1))
    try:
        assert first.add_insecure_port(f"127.0.0.1:{port}") == port
        first.start()
        with pytest.raises(RuntimeError):  # gRPC's default SO_REUSEPORT would let it share
            second.add_insecure_port(f"127.0.0.1:{port}")
    finally:
        first.stop(None)
        second.stop(None)


def test_free_port_never_hands_out_a_port_twice():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
