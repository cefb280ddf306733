"""The OTel -> Prometheus bridge: instruments of a MeterProvider read by PrometheusReader come out
in Prometheus' text format, parsed back with prometheus_client's own parser."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pathways import metrics


def _scrape(reader) -> dict:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics._Collector(reader))
    text = generate_latest(reg).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_counters_histograms_and_gauges_keep_their_values_and_labels():
    reader = metrics.PrometheusReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("t")
    meter.create_counter("pathways.t.calls").add(3, {"code": "OK"})
    h = meter.create_histogram(
        "pathways.t.latency", unit="s", explicit_bucket_boundaries_advisory=(0.1, 1.0)
    )
    for v in (0.05, 0.5, 0.7, 3.0):
        h.record(v, {"model": "m"})
    up = meter.create_up_down_counter("pathways.t.active")
    up.add(2)
    up.add(-1)
    fams = _scrape(reader)
    (calls,) = fams["pathways_t_calls"].samples
    assert calls.name == "pathways_t_calls_total" and calls.value == 3
    assert calls.labels == {"code": "OK"}
    lat = {
        (s.name, s.labels.get("le")): s.value for s in fams["pathways_t_latency_seconds"].samples
    }
    assert lat[("pathways_t_latency_seconds_bucket", "0.1")] == 1
    assert lat[("pathways_t_latency_seconds_bucket", "1.0")] == 3
    assert lat[("pathways_t_latency_seconds_bucket", "+Inf")] == 4
    assert lat[("pathways_t_latency_seconds_count", None)] == 4
    assert abs(lat[("pathways_t_latency_seconds_sum", None)] - 4.25) < 1e-9
    assert fams["pathways_t_active"].type == "gauge"
    assert fams["pathways_t_active"].samples[0].value == 1


def test_a_reader_no_provider_uses_yields_nothing():
    assert metrics.PrometheusReader().families() == []
