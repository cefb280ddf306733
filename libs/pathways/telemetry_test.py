"""Telemetry configuration: OTEL_* variables pick exporters; nothing set means nothing installed."""

import grpc
import pytest
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from pathways import telemetry


@pytest.mark.parametrize(
    "env, traces, metrics",
    [
        ({}, "none", "none"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "otlp", "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, "otlp", "none"),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none"}, "console", "none"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"},
            "none",
            "none",
        ),
    ],
)
def test_exporters_follow_the_standard_variables(env, traces, metrics):
    assert telemetry._exporter("traces", env) == traces
    assert telemetry._exporter("metrics", env) == metrics


def test_unconfigured_is_a_no_op(monkeypatch):
    for k in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
        "OTEL_METRICS_EXPORTER",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    ):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(telemetry, "_state", {})
    assert telemetry.init("test") is False
    assert telemetry.server_interceptors() == []
    ch = grpc.insecure_channel("127.0.0.1:1")
    assert telemetry.channel(ch) is ch
    ch.close()
    seen = []
    m = telemetry.ModuleMetrics("m", lambda: seen.append("sessions"), lambda: seen.append("kv"))
    m.latency("Decode", 1.0)
    m.batch(3)
    # Nothing was installed: the API's own (proxy) provider takes the records and drops them, and
    # no reader ever asks the gauges for a value.
    assert telemetry._state == {"tracing": False}
    assert not isinstance(metrics.get_meter_provider(), MeterProvider)
    assert seen == []


def _points(reader) -> dict[str, list]:
    data = reader.get_metrics_data()
    return {
        metric.name: list(metric.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }


def test_module_metrics_record_per_module_and_method(monkeypatch):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    # ModuleMetrics asks the global API for its meter; hand it this provider's without installing
    # it globally (a global provider can be set only once per process).
    monkeypatch.setattr(telemetry.metrics, "get_meter", provider.get_meter)
    kv = [4096]
    m = telemetry.ModuleMetrics("attn-0", lambda: 3, lambda: kv[0])
    m.latency("Decode", 1.5)
    m.latency("Decode", 2.5)
    m.latency("Prefill", 7.0)
    m.batch(5)
    try:
        points = _points(reader)
        latency = {p.attributes["method"]: p for p in points["pathways.module.latency"]}
        assert set(latency) == {"Decode", "Prefill"}
        assert dict(latency["Decode"].attributes) == {"module": "attn-0", "method": "Decode"}
        assert (latency["Decode"].count, latency["Decode"].sum) == (2, 4.0)
        assert (latency["Prefill"].count, latency["Prefill"].sum) == (1, 7.0)
        (batch,) = points["pathways.module.batch_size"]
        assert dict(batch.attributes) == {"module": "attn-0"}
        assert (batch.count, batch.sum) == (1, 5)
        (sessions,) = points["pathways.module.active_sessions"]
        assert dict(sessions.attributes) == {"module": "attn-0"} and sessions.value == 3
        kv[0] = 8192  # gauges read their callbacks at each collection
        (kv_bytes,) = _points(reader)["pathways.module.kv_cache_bytes"]
        assert dict(kv_bytes.attributes) == {"module": "attn-0"} and kv_bytes.value == 8192
    finally:
        provider.shutdown()
