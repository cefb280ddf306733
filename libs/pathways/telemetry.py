"""OpenTelemetry set-up from the standard OTEL_* variables; nothing configured means no-op.

Traces: OTEL_TRACES_EXPORTER (otlp | console | none), or an OTLP endpoint
(OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) implying otlp. Metrics likewise
with OTEL_METRICS_EXPORTER. Context crosses processes in gRPC metadata (W3C traceparent) through
the interceptors of opentelemetry-instrumentation-grpc, added only when tracing is on.
"""

from __future__ import annotations

import os
import threading

from opentelemetry import metrics, trace

_state: dict[str, object] = {}
_lock = threading.Lock()


def _exporter(kind: str, env=os.environ) -> str:
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return "none"
    name = env.get(f"OTEL_{kind.upper()}_EXPORTER")
    if name:
        return name.split(",")[0].strip().lower()
    has_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
        f"OTEL_EXPORTER_OTLP_{kind.upper()}_ENDPOINT"
    )
    return "otlp" if has_endpoint else "none"


def init(service_name: str, prometheus: bool = False) -> bool:
    """Installs global tracer/meter providers if OTEL_* asks for any, and a meter provider
    read by `pathways.metrics` (Prometheus scrapes) when `prometheus`; returns whether tracing
    is on. The first call in a process decides."""
    with _lock:
        if "tracing" in _state:
            return bool(_state["tracing"])
        traces, mets = _exporter("traces"), _exporter("metrics")
        if traces == "none" and mets == "none" and not prometheus:
            _state["tracing"] = False
            return False
        from opentelemetry.sdk.resources import Resource

        attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
        resource = Resource.create(attrs)
        if traces != "none":
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

            provider = TracerProvider(resource=resource)
            if traces == "console":
                exporter = ConsoleSpanExporter()
            else:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter()
            provider.add_span_processor(BatchSpanProcessor(exporter))
            trace.set_tracer_provider(provider)
            _state["tracer_provider"] = provider
        if mets != "none" or prometheus:
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import (
                ConsoleMetricExporter,
                PeriodicExportingMetricReader,
            )

            readers = []
            if mets == "console":
                readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
            elif mets != "none":
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                    OTLPMetricExporter,
                )

                readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
            if prometheus:
                from pathways import metrics as prom

                readers.append(prom.reader())
            meter_provider = MeterProvider(resource=resource, metric_readers=readers)
            metrics.set_meter_provider(meter_provider)
            _state["meter_provider"] = meter_provider
        _state["tracing"] = traces != "none"
        return traces != "none"


def server_interceptors() -> list:
    """gRPC server interceptors: a span per incoming call, joined to the caller's trace."""
    if not _state.get("tracing"):
        return []
    from opentelemetry.instrumentation.grpc import server_interceptor

    return [server_interceptor()]


def channel(ch):
    """Wraps a client channel so each call gets a span and carries the trace context."""
    if not _state.get("tracing"):
        return ch
    from opentelemetry.instrumentation.grpc import client_interceptor
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

    return intercept_channel(ch, client_interceptor())


def aio_interceptors() -> list:
    """Client interceptors for grpc.aio channels: a span per call, carrying the trace context."""
    if not _state.get("tracing"):
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def tracer():
    return trace.get_tracer("pathways")


def shutdown() -> None:
    """Flushes and stops exporters (call before the process exits)."""
    for key in ("tracer_provider", "meter_provider"):
        p = _state.pop(key, None)
        if p is not None:
            p.shutdown()


class ModuleMetrics:
    """Per-module instruments: call latency, decode batch size, active sessions, KV-cache bytes."""

    def __init__(self, module: str, sessions_fn, kv_bytes_fn):
        meter = metrics.get_meter("pathways.serving")
        self._attrs = {"module": module}
        self._latency = meter.create_histogram(
            "pathways.module.latency", unit="ms", description="module rpc latency by method"
        )
        self._batch = meter.create_histogram(
            "pathways.module.batch_size",
            unit="{row}",
            description="rows per decode batch",
            explicit_bucket_boundaries_advisory=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        attrs = self._attrs
        meter.create_observable_gauge(
            "pathways.module.active_sessions",
            unit="{session}",
            callbacks=[lambda _o: [metrics.Observation(sessions_fn(), attrs)]],
        )
        meter.create_observable_gauge(
            "pathways.module.kv_cache_bytes",
            unit="By",
            callbacks=[lambda _o: [metrics.Observation(kv_bytes_fn(), attrs)]],
        )

    def latency(self, method: str, ms: float) -> None:
        self._latency.record(ms, {**self._attrs, "method": method})

    def batch(self, rows: int) -> None:
        self._batch.record(rows, self._attrs)
