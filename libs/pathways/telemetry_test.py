"""Telemetry configuration: OTEL_* variables pick exporters; nothing set means nothing installed."""

import grpc
import pytest

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
    m = telemetry.ModuleMetrics("m", lambda: 0, lambda: 0)  # API no-op instruments
    m.latency("Decode", 1.0)
    m.batch(3)
