"""k8s/grafana-dashboard.json against the code, without a deployment: every gateway series it
queries is one GatewayMetrics exports, grouped by labels those series carry, and the gateway's
per-hop latency has a panel. (tests/http_front_test.py checks every query against the series a
real deployment emits after traffic.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pathways import metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "k8s" / "grafana-dashboard.json"
GATEWAY_SERIES = re.compile(r"\bpathways_gateway_[a-z_]+")


def _exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


@pytest.fixture
def gateway_samples(monkeypatch) -> list:
    """What the gateway's /metrics shows after two hops and one stream: its samples."""
    reader = metrics.PrometheusReader()
    provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(metrics.metrics, "get_meter", provider.get_meter)
    gateway = metrics.GatewayMetrics()
    gateway.hop("attn-0", "Decode", 0.004)  # how RemoteExecutor.on_hop reports a call
    gateway.hop("attn-0+attn-1", "Prefill", 0.02)
    stream = gateway.generation("tiny")
    stream.token()
    stream.token()
    stream.status = "OK"
    stream.finish()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics._Collector(reader))
    text = generate_latest(registry).decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def test_every_gateway_series_the_dashboard_queries_is_exported(gateway_samples):
    labels: dict[str, set[str]] = {}
    for s in gateway_samples:
        labels.setdefault(s.name, set()).update(s.labels)
    for expr in _exprs():
        for series in GATEWAY_SERIES.findall(expr):
            assert series in labels, f"{series} (in {expr!r}) is not exported; got {sorted(labels)}"
            for group in re.findall(r"\bby \(([^)]*)\)", expr):
                wanted = {g.strip() for g in group.split(",")}
                assert wanted <= labels[series], (expr, wanted - labels[series])


def test_the_gateway_hop_latency_has_a_panel(gateway_samples):
    hops = {s.name for s in gateway_samples if "hop" in s.labels and s.name.endswith("_bucket")}
    assert hops == {"pathways_gateway_hop_latency_milliseconds_bucket"}
    queried = [e for e in _exprs() if hops & set(GATEWAY_SERIES.findall(e))]
    # Grouped by hop: one line per module (or modules one server hosts) as the gateway sees it.
    assert queried and all(re.search(r"\bby \([^)]*\bhop\b", e) for e in queried), queried
