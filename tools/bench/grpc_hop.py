"""One gRPC round trip on loopback, hot (back to back) and cold (after an idle gap), for the
sync and asyncio servers, unary and bidi-stream calls: what a decode hop between module
processes costs when the receiving process has been idle for a token's worth of time.

    PYTHONPATH=libs:.:build/gen python tools/bench/grpc_hop.py --gaps-ms 0,1,5,30

The servers echo a (1, 1, 768) float32 DecodeResponse (a GPT-2 activation); the client is this
process (`DecodeStream` for the stream, the sync stub for unary), as in `RemoteExecutor`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import socket
import subprocess
import sys
import time
from concurrent import futures

import grpc
import numpy as np

from pathways import codec
from pathways.v1 import module_pb2, module_pb2_grpc

_OUT = None


def _reply():
    global _OUT
    if _OUT is None:
        _OUT = module_pb2.DecodeResponse(output=codec.encode(np.ones((1, 1, 768), np.float32)))
    return _OUT


class _Sync(module_pb2_grpc.ModuleServiceServicer):
    def Decode(self, request, context):
        return _reply()

    def DecodeStream(self, request_iterator, context):
        for _ in request_iterator:
            yield module_pb2.DecodeStreamResponse(step=_reply())


class _Aio(module_pb2_grpc.ModuleServiceServicer):
    async def Decode(self, request, context):
        return _reply()

    async def DecodeStream(self, request_iterator, context):
        async for _ in request_iterator:
            yield module_pb2.DecodeStreamResponse(step=_reply())


def serve(kind: str, address: str) -> None:
    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(8))
        module_pb2_grpc.add_ModuleServiceServicer_to_server(_Sync(), server)
        server.add_insecure_port(address)
        server.start()
        server.wait_for_termination()
        return

    async def main():
        server = grpc.aio.server()
        module_pb2_grpc.add_ModuleServiceServicer_to_server(_Aio(), server)
        server.add_insecure_port(address)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    from pathways.executor.decode_stream import DecodeStream
    from tools.bench.common import print_table, write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gaps-ms", default="0,1,5,30", help="idle time before each timed call")
    p.add_argument("--calls", type=int, default=80, help="timed calls per cell (median)")
    p.add_argument("--serve", nargs=2, metavar=("KIND", "ADDRESS"), help=argparse.SUPPRESS)
    p.add_argument("--json", default="tools/bench/results/grpc_hop.json")
    args = p.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    gaps = [float(g) / 1e3 for g in args.gaps_ms.split(",")]
    req = module_pb2.DecodeRequest(
        session_id="s", input=codec.encode(np.ones((1, 1, 768), np.float32)), positions=[3]
    )
    rows = []
    for kind in ("sync", "aio"):
        address = f"127.0.0.1:{_free_port()}"
        proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, address])
        channel = grpc.insecure_channel(address)
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = module_pb2_grpc.ModuleServiceStub(channel)
            stream = DecodeStream(stub, time.monotonic() + 3600)
            calls = {
                "unary": functools.partial(stub.Decode, req, timeout=10),
                "stream": functools.partial(stream.step, req),
            }
            for transport, call in calls.items():
                for _ in range(20):
                    call()
                for gap in gaps:
                    ts = []
                    for _ in range(args.calls):
                        if gap:
                            time.sleep(gap)
                        t0 = time.perf_counter()
                        call()
                        ts.append(time.perf_counter() - t0)
                    rows.append(
                        {
                            "server": kind,
                            "call": transport,
                            "gap_ms": gap * 1e3,
                            "p50_ms": float(np.median(ts)) * 1e3,
                            "p90_ms": float(np.percentile(ts, 90)) * 1e3,
                        }
                    )
            stream.close()
        finally:
            channel.close()
            proc.kill()
            proc.wait()
    print_table(
        rows,
        [
            ("server", "server", ""),
            ("call", "call", ""),
            ("gap_ms", "idle gap ms", ".0f"),
            ("p50_ms", "round trip p50 ms", ".3f"),
            ("p90_ms", "p90 ms", ".3f"),
        ],
    )
    print(f"wrote {write_json(args.json, 'grpc_hop', rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
