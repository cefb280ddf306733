"""Per-token overhead of a chain of module processes by message topology, without model code.

Four gRPC server processes stand in for GPT-2 small's modules: each spends a fixed CPU time per
step (busy, like a decode step: `--compute-ms`) and answers with a (1, 1, 768) float32
activation. Two ways to run a token through them:
  star  the client (a gateway) calls each server in turn over a bidi stream (8 messages per
        token; what `RemoteExecutor` does today);
  ring  the client sends to the first server, each server forwards to the next over its own
        stream, the last one answers on a stream the client opened to it (5 messages).
Overhead = ms per token - the compute. This bounds what forwarding activations module to module
can buy, and what any hop costs here before our own code does anything.

    PYTHONPATH=libs:.:build/gen python tools/bench/chain_topology.py
"""

from __future__ import annotations

import argparse
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np

from pathways import codec
from pathways.v1 import module_pb2, module_pb2_grpc

SUBSCRIBE, RING = "subscribe", "ring"


def _busy(ms: float) -> None:
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) * 1e3 < ms:
        pass


class _Server(module_pb2_grpc.ModuleServiceServicer):
    def __init__(self, compute_ms: float, next_address: str | None):
        self.compute_ms, self.next_address = compute_ms, next_address
        self.reply = module_pb2.DecodeResponse(
            output=codec.encode(np.ones((1, 1, 768), np.float32))
        )
        self._results: queue.SimpleQueue | None = None  # the tail's subscriber
        self._forward: queue.SimpleQueue | None = None  # requests to the next server

    def _send_on(self) -> None:
        if self._forward is None:
            self._forward = queue.SimpleQueue()
            stub = module_pb2_grpc.ModuleServiceStub(grpc.insecure_channel(self.next_address))
            responses = stub.DecodeStream(iter(self._forward.get, None))
            threading.Thread(target=lambda: [None for _ in responses], daemon=True).start()
        step = module_pb2.DecodeRequest(session_id=RING, input=self.reply.output)
        self._forward.put(module_pb2.DecodeStreamRequest(step=step))

    def DecodeStream(self, request_iterator, context):
        for request in request_iterator:
            kind = request.step.session_id
            if kind == SUBSCRIBE:
                self._results = queue.SimpleQueue()
                while True:
                    yield module_pb2.DecodeStreamResponse(step=self._results.get())
            _busy(self.compute_ms)
            if kind != RING:
                yield module_pb2.DecodeStreamResponse(step=self.reply)
            elif self.next_address:
                self._send_on()
            else:
                self._results.put(self.reply)


def _serve(compute_ms: float, address: str, next_address: str | None) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(8))
    module_pb2_grpc.add_ModuleServiceServicer_to_server(_Server(compute_ms, next_address), server)
    server.add_insecure_port(address)
    server.start()
    server.wait_for_termination()


def _address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _stream(stub):
    requests: queue.SimpleQueue = queue.SimpleQueue()
    return requests, stub.DecodeStream(iter(requests.get, None))


def main(argv=None) -> int:
    from tools.bench.common import print_table, write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compute-ms", default="0.05,12,12,11", help="per server, in chain order")
    p.add_argument("--tokens", type=int, default=30, help="per round")
    p.add_argument("--rounds", type=int, default=6, help="alternating star/ring rounds")
    p.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--json", default="tools/bench/results/chain_topology.json")
    args = p.parse_args(argv)
    if args.serve:
        compute, address, nxt = args.serve
        _serve(float(compute), address, nxt or None)
        return 0
    compute = [float(c) for c in args.compute_ms.split(",")]
    addresses = [_address() for _ in compute]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                str(c),
                a,
                addresses[i + 1] if i + 1 < len(compute) else "",
            ]
        )
        for i, (c, a) in enumerate(zip(compute, addresses))
    ]
    try:
        channels = [grpc.insecure_channel(a) for a in addresses]
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=60)
        stubs = [module_pb2_grpc.ModuleServiceStub(ch) for ch in channels]
        x = codec.encode(np.ones((1, 1, 768), np.float32))
        star_step = module_pb2.DecodeStreamRequest(step=module_pb2.DecodeRequest(input=x))
        star_streams = [_stream(s) for s in stubs]

        def star():
            for requests, responses in star_streams:
                requests.put(star_step)
                next(responses)

        sub_requests, results = _stream(stubs[-1])
        sub_requests.put(
            module_pb2.DecodeStreamRequest(step=module_pb2.DecodeRequest(session_id=SUBSCRIBE))
        )
        head_requests, head_call = _stream(stubs[0])  # kept: a dropped call is cancelled
        ring_step = module_pb2.DecodeStreamRequest(
            step=module_pb2.DecodeRequest(session_id=RING, input=x)
        )

        def ring():
            head_requests.put(ring_step)
            next(results)

        runs = {"star": star, "ring": ring}
        for run in runs.values():
            for _ in range(5):
                run()
        ms = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                for _ in range(args.tokens):
                    run()
                ms[name].append((time.perf_counter() - t0) / args.tokens * 1e3)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    total = sum(compute)
    rows = [
        {
            "topology": name,
            "messages": 2 * len(compute) if name == "star" else len(compute) + 1,
            "best_ms": min(v),
            "median_ms": float(np.median(v)),
            "overhead_ms": min(v) - total,
        }
        for name, v in ms.items()
    ]
    print(f"compute per token {total:.2f} ms over {len(compute)} servers")
    print_table(
        rows,
        [
            ("topology", "topology", ""),
            ("messages", "messages/token", "d"),
            ("best_ms", "best ms/token", ".2f"),
            ("median_ms", "median ms/token", ".2f"),
            ("overhead_ms", "overhead ms (best)", ".2f"),
        ],
    )
    print(f"wrote {write_json(args.json, 'chain_topology', rows, compute_ms=compute)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
