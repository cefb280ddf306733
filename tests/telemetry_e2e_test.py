"""One Generate is one trace with spans from every module process, received over real OTLP/gRPC."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from pathways.deploy import launcher
from pathways.serving import testing
from pathways.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.slow


class Receiver(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    """A minimal OTLP collector: keeps (service.name, span) and (service.name, metric name)."""

    def __init__(self):
        self.spans, self.metrics, self.lock = [], set(), threading.Lock()

    def Export(self, request, context):
        with self.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                for rs in request.resource_spans:
                    svc = _service(rs.resource)
                    self.spans += [(svc, s) for ss in rs.scope_spans for s in ss.spans]
                return trace_service_pb2.ExportTraceServiceResponse()
            for rm in request.resource_metrics:
                svc = _service(rm.resource)
                self.metrics |= {(svc, m.name) for sm in rm.scope_metrics for m in sm.metrics}
            return metrics_service_pb2.ExportMetricsServiceResponse()


def _service(resource) -> str:
    return next(a.value.string_value for a in resource.attributes if a.key == "service.name")


def test_generate_trace_spans_every_module_process(tmp_path):
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    }
    local = testing.make_checkpoint(tmp_path / "ckpt")
    modules = list(local.spec.pathway("tiny").modules)
    try:
        with launcher.Fleet(str(tmp_path / "ckpt"), modules, env=env) as fleet:
            gw = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(fleet.gateway.address))
            req = gateway_pb2.GenerateRequest(
                pathway="tiny", prompt="hi", sampling=gateway_pb2.SamplingOptions(max_new_tokens=3)
            )
            assert len(list(gw.Generate(req, timeout=60))) == 3
            want = {f"pathways-module-{m}" for m in modules}
            end = time.monotonic() + 30
            while time.monotonic() < end:
                with receiver.lock:
                    roots = [
                        s
                        for svc, s in receiver.spans
                        if svc == "pathways-gateway" and s.name.endswith("GatewayService/Generate")
                    ]
                    trace_ids = {s.trace_id for s in roots}
                    in_trace = {svc for svc, s in receiver.spans if s.trace_id in trace_ids}
                    got_metrics = {
                        svc for svc, name in receiver.metrics if name == "pathways.module.latency"
                    }
                if roots and want <= in_trace and want <= got_metrics:
                    break
                time.sleep(0.5)
            assert len(trace_ids) == 1, "one trace per Generate"
            assert want <= in_trace, f"module processes in the trace: {sorted(in_trace)}"
            assert want <= got_metrics
            with receiver.lock:
                names = {n for _, n in receiver.metrics}
            assert {
                "pathways.module.active_sessions",
                "pathways.module.kv_cache_bytes",
                "pathways.module.batch_size",
            } <= names
    finally:
        server.stop(0)


def test_a_trace_continues_from_an_http_caller_through_the_front_to_every_module(tmp_path):
    """A caller's W3C traceparent on an HTTP request: the HTTP front's, the gateway's and every
    module server's spans of that request carry the caller's trace id."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    local = testing.make_checkpoint(tmp_path / "ckpt")
    modules = list(local.spec.pathway("tiny").modules)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    front = None
    try:
        with launcher.Fleet(str(tmp_path / "ckpt"), modules, env=env) as fleet:
            front = launcher.start_http_front(fleet.gateway.address, env=env)
            launcher.wait_http_ready(front)
            r = httpx.post(
                front.url + "/v1/completions",
                json={"model": "tiny", "prompt": "hi", "max_tokens": 3},
                headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            want = {"pathways-http-front", "pathways-gateway"}
            want |= {f"pathways-module-{m}" for m in modules}
            end = time.monotonic() + 30
            while time.monotonic() < end:
                with receiver.lock:
                    in_trace = {svc for svc, s in receiver.spans if s.trace_id.hex() == trace_id}
                if want <= in_trace:
                    break
                time.sleep(0.5)
            assert want <= in_trace, f"processes in the caller's trace: {sorted(in_trace)}"
    finally:
        if front is not None:
            front.stop()
        server.stop(0)
